fn main() -> std::process::ExitCode {
    call::cli::main()
}
