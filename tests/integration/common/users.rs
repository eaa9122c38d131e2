//! Users of the `call` binary for CLI tests: one home directory each, real relays.

use std::path::PathBuf;
use std::process::{Command, Output};

use call::group::{GroupMember, GroupRef, Home, MdkSqliteStorage};
use nostr_sdk::prelude::*;
use serde_json::Value;

/// One user: a fresh home directory, removed on drop.
pub struct User {
    pub home: PathBuf,
    pub relays: String,
}

impl User {
    pub fn new(tag: &str, relays: &[&url::Url]) -> Self {
        let home = std::env::temp_dir().join(format!(
            "call-test-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        Self {
            home,
            relays: relays
                .iter()
                .map(|u| u.as_str().trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_call"));
        for (k, _) in std::env::vars() {
            if k.starts_with("CALL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("CALL_HOME", &self.home)
            .env("CALL_NOSTR_RELAYS", &self.relays)
            .env("CALL_NOSTR_TIMEOUT", "3")
            .env("CALL_LOG", "warn");
        cmd
    }

    /// Runs `call <args> --json` in a blocking task; returns the output.
    pub async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.args(args).arg("--json");
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// Runs a command that must succeed and print one JSON object.
    pub async fn ok(&self, args: &[&str]) -> Value {
        let out = self.run(args).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "call {args:?}\nstdout: {stdout}\nstderr: {stderr}"
        );
        assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
        serde_json::from_str(&stdout).unwrap()
    }

    pub async fn new_identity(&self) -> String {
        self.ok(&["id", "new"]).await["npub"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn members(&self, group: &str) -> (Vec<String>, u64) {
        let v = self.ok(&["group", "members", group]).await;
        let mut hex: Vec<String> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["hex"].as_str().unwrap().to_string())
            .collect();
        hex.sort();
        (hex, v["group"]["epoch"].as_u64().unwrap())
    }

    /// Opens this user's home through the library (no `call` process may be running).
    pub async fn open_member(&self, relay: &url::Url) -> (Home, GroupMember<MdkSqliteStorage>) {
        let home = Home::open(&self.home).unwrap();
        let keys = home.keys().unwrap();
        let storage = home.storage().unwrap();
        let url = RelayUrl::parse(relay.as_str()).unwrap();
        let member = GroupMember::connect(keys, storage, &[url]).await.unwrap();
        (home, member)
    }

    /// The call secret this user's state exports for `group` now.
    pub async fn call_secret(
        &self,
        relay: &url::Url,
        group: &str,
    ) -> Result<call::group::CallSecretExport, call::group::GroupError> {
        let (_home, m) = self.open_member(relay).await;
        let s = m.export_call_secret(&group_ref(&m, group), &[9u8; 32]);
        m.disconnect().await;
        s
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

pub fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) * 1_000_000
        + u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_micros(),
        )
}

pub fn group_ref(member: &GroupMember<MdkSqliteStorage>, name: &str) -> GroupRef {
    let g = member
        .groups()
        .unwrap()
        .into_iter()
        .find(|g| g.name == name)
        .unwrap();
    GroupRef {
        mls_group_id: g.mls_group_id,
        nostr_group_id: g.nostr_group_id,
    }
}

/// A creates `name` and invites the others, who accept; returns nothing, asserts each step.
pub async fn create_and_join(name: &str, admin: &User, guests: &[(&User, &str)]) {
    for (g, _) in guests {
        g.ok(&["keys", "publish"]).await;
    }
    let mut args = vec!["group", "create", name];
    for (_, npub) in guests {
        args.push("--invite");
        args.push(npub);
    }
    let created = admin.ok(&args).await;
    assert_eq!(created["name"], name);
    for (g, _) in guests {
        let pending = g.ok(&["group", "pending"]).await;
        let list = pending["pending"].as_array().unwrap();
        let ours: Vec<&Value> = list.iter().filter(|w| w["group_name"] == name).collect();
        assert_eq!(ours.len(), 1, "{pending}");
        assert_eq!(ours[0]["group_id"], created["id"]);
        let prefix = &ours[0]["id"].as_str().unwrap()[..12];
        let accepted = g.ok(&["group", "accept", prefix]).await;
        assert_eq!(accepted["joined"][0]["id"], created["id"]);
        assert_eq!(accepted["key_package_replenished"], true);
    }
}
