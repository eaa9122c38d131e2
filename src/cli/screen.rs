//! The live screen of `call join` on a terminal: who is in the call (by name), who speaks
//! and how loud, who is muted, loss and delay per participant, the relay's state, epoch and
//! call time, and the keys. The drawing ([`draw`]) is a pure function of a [`View`], which
//! the call's events ([`View::apply`]) keep up to date; [`Screen`] puts it on the terminal.

use std::collections::{BTreeMap, VecDeque};
use std::io::Stderr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{execute, terminal};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Padding, Paragraph, Row, Table, Wrap};
use ratatui::{Frame, Terminal};
use tokio::sync::mpsc;

use crate::call::session::{CallEvent, RelayState, UserCommand};

/// How often the screen gets a status (levels, loss, relay) from the engine.
pub const SCREEN_STATUS_INTERVAL: Duration = Duration::from_millis(250);
/// Lines of recent happenings kept (joins, leaves, logs).
const NOTES_KEPT: usize = 4;
/// Width of a level meter, in cells.
const METER: usize = 10;
/// The quietest level the meter shows (dBFS); silence below it is an empty meter.
const METER_FLOOR_DB: f32 = -60.0;
/// Widths of the participant columns: name, speaking dot, meter, state, loss, delay. The
/// "you" line above the table uses the same ones, so the dots and meters line up.
const COLUMNS: [u16; 6] = [24, 1, METER as u16, 5, 6, 8];
/// Cells between two columns.
const COLUMN_GAP: u16 = 2;

/// One participant as the screen shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    pub npub: String,
    pub level: f32,
    pub speaking: bool,
    pub muted: bool,
    pub lost: bool,
    pub loss_pct: f64,
    /// Estimated mouth-to-ear (or, before an RTT is known, the jitter buffer's delay).
    pub delay_ms: Option<f64>,
}

impl PeerView {
    fn new(npub: &str) -> Self {
        Self {
            npub: npub.to_string(),
            level: 0.0,
            speaking: false,
            muted: false,
            lost: false,
            loss_pct: 0.0,
            delay_ms: None,
        }
    }
}

/// Everything the screen shows.
#[derive(Debug, Clone)]
pub struct View {
    pub group: String,
    pub call_id: Option<String>,
    pub started: bool,
    pub seconds: f64,
    pub epoch: u64,
    pub muted: bool,
    pub level: f32,
    pub relay: RelayState,
    pub relay_rtt_ms: Option<f64>,
    pub peers: Vec<PeerView>,
    /// Names by npub (kind-0 `display_name` or `name`).
    pub names: BTreeMap<String, String>,
    pub notes: VecDeque<String>,
    pub help: bool,
}

impl View {
    pub fn new(group: &str) -> Self {
        Self {
            group: group.to_string(),
            call_id: None,
            started: false,
            seconds: 0.0,
            epoch: 0,
            muted: false,
            level: 0.0,
            relay: RelayState::Connecting,
            relay_rtt_ms: None,
            peers: Vec::new(),
            names: BTreeMap::new(),
            notes: VecDeque::new(),
            help: false,
        }
    }

    /// A participant's name, or its npub shortened.
    pub fn name_of(&self, npub: &str) -> String {
        self.names
            .get(npub)
            .cloned()
            .unwrap_or_else(|| short_npub(npub))
    }

    pub fn note(&mut self, text: String) {
        if self.notes.len() >= NOTES_KEPT {
            self.notes.pop_front();
        }
        self.notes.push_back(text);
    }

    fn peer(&mut self, npub: &str) -> Option<&mut PeerView> {
        self.peers.iter_mut().find(|p| p.npub == npub)
    }

    /// Takes in one event of the call.
    pub fn apply(&mut self, event: &CallEvent) {
        match event {
            CallEvent::Started { call_id } => {
                self.call_id = Some(call_id.clone());
                self.started = true;
                self.note("call started; ringing the others".into());
            }
            CallEvent::Joined {
                call_id,
                participants,
            } => {
                self.call_id = Some(call_id.clone());
                self.note(format!("joined ({participants} others in the call)"));
            }
            CallEvent::PeerJoined { npub, .. } => {
                if self.peer(npub).is_none() {
                    self.peers.push(PeerView::new(npub));
                }
                let name = self.name_of(npub);
                self.note(format!("+ {name} joined"));
            }
            CallEvent::PeerLeft { npub, why } => {
                self.peers.retain(|p| &p.npub != npub);
                let name = self.name_of(npub);
                self.note(format!("- {name}: {why}"));
            }
            CallEvent::PeerLost { npub } => {
                if let Some(p) = self.peer(npub) {
                    p.lost = true;
                }
                let name = self.name_of(npub);
                self.note(format!("? {name}: nothing heard for 3 s"));
            }
            CallEvent::PeerBack { npub } => {
                if let Some(p) = self.peer(npub) {
                    p.lost = false;
                }
                let name = self.name_of(npub);
                self.note(format!("+ {name} is back"));
            }
            CallEvent::PeerDeclined { npub, status, .. } => {
                let name = self.name_of(npub);
                self.note(format!("{name}: {status}"));
            }
            CallEvent::PeerMuted { npub, muted } => {
                if let Some(p) = self.peer(npub) {
                    p.muted = *muted;
                }
            }
            CallEvent::Muted { muted } => self.muted = *muted,
            CallEvent::Rekeyed { epoch } => {
                self.epoch = *epoch;
                self.note(format!("epoch {epoch}: call keys replaced"));
            }
            CallEvent::Status(s) => {
                self.seconds = s.seconds;
                self.epoch = s.epoch;
                self.muted = s.muted;
                self.level = s.level;
                self.relay = s.relay;
                self.relay_rtt_ms = s.relay_rtt_ms;
                self.peers = s
                    .peers
                    .iter()
                    .map(|p| PeerView {
                        npub: p.npub.clone(),
                        level: p.level,
                        speaking: p.speaking,
                        muted: p.muted,
                        lost: p.lost,
                        loss_pct: p.loss_pct,
                        delay_ms: p
                            .mouth_to_ear_ms
                            .map(|l| l.p50)
                            .or(Some(p.jitter.target_delay_ms)),
                    })
                    .collect();
            }
        }
    }
}

/// `npub1abcd…wxyz`: enough to tell people apart on a screen.
pub fn short_npub(npub: &str) -> String {
    if npub.len() <= 16 {
        return npub.to_string();
    }
    format!("{}…{}", &npub[..9], &npub[npub.len() - 4..])
}

/// A level meter of `width` cells: −60 dBFS empty, 0 dBFS full.
pub fn meter(level: f32, width: usize) -> String {
    let db = if level > 0.0 {
        20.0 * level.log10()
    } else {
        METER_FLOOR_DB
    };
    let fill = ((db - METER_FLOOR_DB) / -METER_FLOOR_DB).clamp(0.0, 1.0);
    let cells = (fill * width as f32).round() as usize;
    format!("{}{}", "█".repeat(cells), "·".repeat(width - cells))
}

fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Draws `view` into the whole frame. Fits 80×24; more participants than rows are
/// summed up in one line.
pub fn draw(frame: &mut Frame, view: &View) {
    let area = frame.area();
    let [header, you, peers, notes, keys] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(NOTES_KEPT as u16 + 1),
        Constraint::Length(1),
    ])
    .areas(area);

    let call = view
        .call_id
        .as_deref()
        .map_or_else(|| "…".to_string(), |c| format!("{}…", &c[..8.min(c.len())]));
    let relay_color = match view.relay {
        RelayState::Connected => Color::Green,
        RelayState::Connecting | RelayState::Reconnecting => Color::Yellow,
        RelayState::Lost => Color::Red,
    };
    let rtt = view
        .relay_rtt_ms
        .map_or_else(|| "-".into(), |r| format!("{r:.0} ms"));
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(vec![
                Span::styled(
                    format!(" {} ", view.group),
                    Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED),
                ),
                Span::raw(format!(
                    "  call {call}  {}  epoch {}",
                    clock(view.seconds),
                    view.epoch
                )),
            ]),
            Line::from(vec![
                Span::raw(" relay "),
                Span::styled(view.relay.as_str(), Style::new().fg(relay_color).bold()),
                Span::raw(format!("  rtt {rtt}")),
            ]),
        ]),
        header,
    );

    // Laid out as a row of the participants' table (one cell of margin, then its columns).
    let gap = " ".repeat(usize::from(COLUMN_GAP));
    let you_line = Line::from(vec![
        Span::raw(format!(" {:<w$}{gap}", "you", w = usize::from(COLUMNS[0]))),
        Span::raw(if view.muted {
            " ".to_string()
        } else {
            speaking_dot(view.level >= crate::call::engine::SPEAKING_LEVEL)
        }),
        Span::raw(gap.clone()),
        Span::styled(
            meter(if view.muted { 0.0 } else { view.level }, METER),
            Style::new().fg(Color::Cyan),
        ),
        Span::raw(gap),
        if view.muted {
            Span::styled("MUTED", Style::new().fg(Color::Red).bold())
        } else {
            Span::raw("live")
        },
    ]);
    frame.render_widget(Paragraph::new(you_line), you);

    if view.help {
        let help = vec![
            Line::from(" m   mute or unmute your microphone (the others see it)"),
            Line::from(" q   leave the call (also Esc or Ctrl-C)"),
            Line::from(" ?   this help"),
            Line::from(""),
            Line::from(" ● speaking   loss: frames concealed or rebuilt, last 2 s"),
            Line::from(" delay: estimated mouth-to-ear (capture, relay, buffer)"),
        ];
        frame.render_widget(
            Paragraph::new(help)
                .block(Block::new().borders(Borders::TOP).title(" help "))
                .wrap(Wrap { trim: false }),
            peers,
        );
    } else {
        draw_peers(frame, view, peers);
    }

    // Cut, not wrapped: four lines of notes stay four lines.
    let room = usize::from(notes.width.saturating_sub(1));
    let note_lines: Vec<Line> = view
        .notes
        .iter()
        .map(|n| Line::from(format!(" {}", ellipsize(n, room))).dim())
        .collect();
    frame.render_widget(
        Paragraph::new(note_lines).block(Block::new().borders(Borders::TOP)),
        notes,
    );
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(" m", Style::new().bold()),
            Span::raw(if view.muted { " unmute  " } else { " mute  " }),
            Span::styled("q", Style::new().bold()),
            Span::raw(" leave  "),
            Span::styled("?", Style::new().bold()),
            Span::raw(" help"),
        ])),
        keys,
    );
}

/// `text` cut to `width` characters, the last of them `…` if it was cut.
fn ellipsize(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn speaking_dot(speaking: bool) -> String {
    if speaking { "●" } else { "○" }.to_string()
}

fn draw_peers(frame: &mut Frame, view: &View, area: Rect) {
    let header = Row::new(vec!["name", "", "level", "", "loss", "delay"])
        .style(Style::new().add_modifier(Modifier::UNDERLINED));
    // One row is the header, one the border; keep one for "+N more".
    let room = (area.height as usize).saturating_sub(2);
    let shown = if view.peers.len() > room {
        room.saturating_sub(1)
    } else {
        view.peers.len()
    };
    let mut rows: Vec<Row> = view.peers[..shown]
        .iter()
        .map(|p| {
            let state = if p.lost {
                Span::styled("lost", Style::new().fg(Color::Red))
            } else if p.muted {
                Span::styled("muted", Style::new().fg(Color::Yellow))
            } else {
                Span::raw("")
            };
            let loss_style = match p.loss_pct {
                l if l >= 10.0 => Style::new().fg(Color::Red),
                l if l >= 2.0 => Style::new().fg(Color::Yellow),
                _ => Style::new(),
            };
            Row::new(vec![
                Line::from(view.name_of(&p.npub)),
                Line::from(speaking_dot(p.speaking && !p.lost)),
                Line::from(Span::styled(
                    meter(p.level, METER),
                    Style::new().fg(Color::Cyan),
                )),
                Line::from(state),
                Line::from(Span::styled(format!("{:>4.1}%", p.loss_pct), loss_style)),
                Line::from(
                    p.delay_ms
                        .map_or_else(|| "-".into(), |d| format!("{d:>4.0} ms")),
                ),
            ])
        })
        .collect();
    if shown < view.peers.len() {
        rows.push(Row::new(vec![format!(
            "+{} more",
            view.peers.len() - shown
        )]));
    }
    let title = match view.peers.len() {
        0 if view.started => " waiting for the others ".to_string(),
        0 => " nobody else here ".to_string(),
        n => format!(" {n} other{} ", if n == 1 { "" } else { "s" }),
    };
    let table = Table::new(rows, COLUMNS.map(Constraint::Length))
        .column_spacing(COLUMN_GAP)
        .block(
            Block::new()
                .borders(Borders::TOP)
                .title(title)
                .padding(Padding::left(1)),
        );
    // Column names only above somebody.
    let table = match view.peers.is_empty() {
        true => table,
        false => table.header(header),
    };
    frame.render_widget(table, area);
}

/// The live screen on the terminal (stderr, so stdout keeps the final report). Leaving it
/// (drop) restores the terminal, also when the call fails.
pub struct Screen {
    terminal: Terminal<CrosstermBackend<Stderr>>,
    pub view: View,
    names: Arc<Mutex<BTreeMap<String, String>>>,
    help: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Screen {
    /// Takes over the terminal; keys go to the returned channel as commands.
    pub fn start(
        group: &str,
        names: Arc<Mutex<BTreeMap<String, String>>>,
    ) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<UserCommand>)> {
        terminal::enable_raw_mode()?;
        let mut stderr = std::io::stderr();
        if let Err(e) = execute!(stderr, terminal::EnterAlternateScreen) {
            let _ = terminal::disable_raw_mode();
            return Err(e.into());
        }
        super::output::to_screen(true);
        let terminal = Terminal::new(CrosstermBackend::new(std::io::stderr()))?;
        let help = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel();
        let on_signal = tx.clone();
        tokio::spawn(async move {
            call_relay::stop_signal().await;
            let _ = on_signal.send(UserCommand::Leave);
        });
        let (keys_help, keys_stop) = (help.clone(), stop.clone());
        // A thread, because reading keys blocks; it polls so it can stop with the screen.
        std::thread::spawn(move || {
            let mut muted = false;
            while !keys_stop.load(Ordering::Relaxed) {
                match event::poll(Duration::from_millis(100)) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(_) => break,
                }
                let Ok(Event::Key(key)) = event::read() else {
                    continue;
                };
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                let cmd = match key.code {
                    KeyCode::Char('m') => {
                        muted = !muted;
                        UserCommand::Mute(muted)
                    }
                    KeyCode::Char('q') | KeyCode::Esc => UserCommand::Leave,
                    KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                        UserCommand::Leave
                    }
                    KeyCode::Char('?') | KeyCode::Char('h') => {
                        keys_help.fetch_xor(true, Ordering::Relaxed);
                        continue;
                    }
                    _ => continue,
                };
                if tx.send(cmd).is_err() {
                    break;
                }
            }
        });
        let mut screen = Self {
            terminal,
            view: View::new(group),
            names,
            help,
            stop,
        };
        screen.redraw();
        Ok((screen, rx))
    }

    /// Takes in an event and draws the screen again.
    pub fn on_event(&mut self, event: &CallEvent) {
        self.view.apply(event);
        self.redraw();
    }

    fn redraw(&mut self) {
        if let Ok(names) = self.names.lock() {
            if names.len() != self.view.names.len() {
                self.view.names = names.clone();
            }
        }
        self.view.help = self.help.load(Ordering::Relaxed);
        for line in super::output::take_kept() {
            self.view.note(line);
        }
        let view = &self.view;
        let _ = self.terminal.draw(|f| draw(f, view));
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        super::output::to_screen(false);
        let _ = execute!(std::io::stderr(), terminal::LeaveAlternateScreen);
        let _ = terminal::disable_raw_mode();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::session::{CallStatus, PeerReport};
    use ratatui::backend::TestBackend;

    fn text(view: &View, w: u16, h: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
        terminal.draw(|f| draw(f, view)).unwrap();
        let buf = terminal.backend().buffer().clone();
        let mut out = String::new();
        for y in 0..h {
            for x in 0..w {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn peer_report(npub: &str, leaf: u32, level: f32, muted: bool) -> PeerReport {
        PeerReport {
            npub: npub.into(),
            leaf,
            track: String::new(),
            received: 0,
            rejects: Default::default(),
            jitter: Default::default(),
            distinct_payload_sizes: 0,
            heard_hz: None,
            receive_to_play_ms: None,
            mouth_to_ear_ms: None,
            present: true,
            lost: false,
            muted,
            level,
            speaking: level >= crate::call::engine::SPEAKING_LEVEL,
            loss_pct: 12.5,
        }
    }

    const ALICE: &str = "npub1alice0000000000000000000000000000000000000000000000000000aaaa";
    const BOB: &str = "npub1bob000000000000000000000000000000000000000000000000000000bbbb";

    fn view_with_two() -> View {
        let mut v = View::new("friends");
        v.names.insert(ALICE.into(), "Alice".into());
        v.apply(&CallEvent::Joined {
            call_id: "3fa2b1c4d5e6f708".repeat(4),
            participants: 2,
        });
        v.apply(&CallEvent::Status(CallStatus {
            seconds: 83.0,
            epoch: 4,
            sent: 100,
            muted: true,
            level: 0.2,
            relay: RelayState::Reconnecting,
            relay_rtt_ms: None,
            peers: vec![
                peer_report(ALICE, 0, 0.3, false),
                peer_report(BOB, 1, 0.0, true),
            ],
            group_events: Default::default(),
        }));
        v
    }

    #[test]
    fn names_mute_state_relay_and_keys_fit_80_by_24() {
        let screen = text(&view_with_two(), 80, 24);
        assert!(screen.contains("Alice"), "{screen}");
        // Bob has no kind-0 name: his short npub stands in.
        assert!(screen.contains(&short_npub(BOB)), "{screen}");
        assert!(screen.contains("MUTED"), "we are muted:\n{screen}");
        let bob_row = screen.lines().find(|l| l.contains("npub1bob")).unwrap();
        assert!(bob_row.contains("muted"), "{bob_row}");
        let alice_row = screen.lines().find(|l| l.contains("Alice")).unwrap();
        assert!(
            alice_row.contains('●') && alice_row.contains("12.5%"),
            "{alice_row}"
        );
        assert!(!alice_row.contains("muted"), "{alice_row}");
        assert!(screen.contains("reconnecting"), "{screen}");
        assert!(
            screen.contains("epoch 4") && screen.contains("00:01:23"),
            "{screen}"
        );
        assert!(
            screen.contains("q leave") && screen.contains("? help"),
            "{screen}"
        );
        assert!(screen.contains("call 3fa2b1c4"), "{screen}");
    }

    #[test]
    fn you_line_up_with_the_others_and_long_notes_are_cut_not_wrapped() {
        let mut v = view_with_two();
        v.apply(&CallEvent::Muted { muted: false });
        v.note(format!("WARN {}", "a long log message ".repeat(8)));
        let screen = text(&v, 80, 24);
        let column = |row: &str, what: char| row.chars().position(|c| c == what);
        let you = screen.lines().find(|l| l.contains("you")).unwrap();
        let alice = screen.lines().find(|l| l.contains("Alice")).unwrap();
        assert_eq!(column(you, 'y'), column(alice, 'A'), "{screen}");
        assert_eq!(column(you, '●'), column(alice, '●'), "{screen}");
        assert_eq!(column(you, '█'), column(alice, '█'), "{screen}");
        let note = screen.lines().find(|l| l.contains("WARN")).unwrap();
        assert!(note.trim_end().ends_with('…'), "{note}");
        assert_eq!(screen.lines().filter(|l| l.contains("long log")).count(), 1);
        // Nobody else: no column names over an empty table.
        let alone = text(&View::new("friends"), 80, 24);
        assert!(!alone.contains("delay"), "{alone}");
    }

    #[test]
    fn many_participants_are_summed_up_within_24_rows() {
        let mut v = view_with_two();
        let mut status = CallStatus {
            seconds: 1.0,
            epoch: 1,
            sent: 0,
            muted: false,
            level: 0.0,
            relay: RelayState::Connected,
            relay_rtt_ms: Some(12.0),
            peers: vec![],
            group_events: Default::default(),
        };
        for i in 0..30 {
            status.peers.push(peer_report(
                &format!("npub1peer{i:02}{}", "x".repeat(50)),
                i,
                0.0,
                false,
            ));
        }
        v.apply(&CallEvent::Status(status));
        let screen = text(&v, 80, 24);
        assert!(screen.contains("30 others"), "{screen}");
        assert!(screen.contains("more"), "{screen}");
        assert!(
            screen.contains("q leave"),
            "the keys stay on screen:\n{screen}"
        );
        assert!(
            screen.contains("connected") && screen.contains("rtt 12 ms"),
            "{screen}"
        );
    }

    #[test]
    fn events_keep_the_view_current_and_help_replaces_the_list() {
        let mut v = view_with_two();
        v.apply(&CallEvent::PeerLeft {
            npub: BOB.into(),
            why: "left".into(),
        });
        assert_eq!(v.peers.len(), 1);
        v.apply(&CallEvent::PeerMuted {
            npub: ALICE.into(),
            muted: true,
        });
        assert!(v.peers[0].muted);
        v.apply(&CallEvent::Muted { muted: false });
        let screen = text(&v, 80, 24);
        assert!(screen.contains("left"), "{screen}");
        assert!(!screen.contains("MUTED"), "{screen}");
        v.help = true;
        let screen = text(&v, 80, 24);
        assert!(screen.contains("mute or unmute"), "{screen}");
    }

    #[test]
    fn the_meter_runs_from_silence_to_full_scale() {
        assert_eq!(meter(0.0, 10), "··········");
        assert_eq!(meter(1.0, 10), "██████████");
        assert_eq!(meter(0.001, 10).matches('█').count(), 0, "−60 dBFS");
        assert_eq!(meter(0.0316, 10).matches('█').count(), 5, "−30 dBFS");
        assert_eq!(short_npub(ALICE), "npub1alic…aaaa");
    }
}
