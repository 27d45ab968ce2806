//! Command lines typed in an interactive shell, reconstructed from what the
//! client sends (the keys), so each can be recorded and checked before its
//! Enter reaches the host.
//!
//! What the gate sees is keystrokes, not the shell's own line buffer. It
//! follows the editing keys every line editor shares (printable characters,
//! Backspace, Ctrl-U, Ctrl-W, Ctrl-C) exactly. Keys whose effect depends on
//! the shell's state (Tab completion, history with the arrows or Ctrl-R,
//! cursor movement, yank) make the line **uncertain**: it is still checked
//! as far as it is known and recorded with `uncertain`, but the gate cannot
//! promise it is what ran. Lines typed while a full-screen program holds
//! the terminal (the alternate screen: an editor, a pager) and answers to
//! password prompts are not command lines and are not checked.

/// The longest line kept; longer lines are cut and marked uncertain.
const MAX_LINE: usize = 64 * 1024;

/// A piece of client input, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes to pass on as they are (`start..end` of the fed chunk).
    Bytes(usize, usize),
    /// A completed line: `enter` is the index of its Enter key in the chunk.
    Line {
        /// The line as reconstructed.
        text: String,
        /// Whether keys the gate cannot follow were used.
        uncertain: bool,
        /// Index of the Enter byte.
        enter: usize,
    },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Esc {
    #[default]
    None,
    /// After ESC.
    Start,
    /// Inside a CSI sequence (`ESC [`), with the parameter bytes so far.
    Csi,
    /// After `ESC O`.
    Ss3,
}

/// Follows the keys of one interactive channel.
#[derive(Debug, Default)]
pub struct LineEditor {
    line: Vec<u8>,
    uncertain: bool,
    esc: Esc,
    csi: Vec<u8>,
    /// A full-screen program holds the terminal.
    alternate: bool,
    /// The program asked the terminal for bracketed paste (`ESC [?2004h`).
    paste_enabled: bool,
    /// Between the paste markers: line ends are part of the line (the
    /// program inserts them and runs nothing until the real Enter).
    in_paste: bool,
    /// The host asked for a password: the next line is not a command.
    secret: bool,
    /// The terminal is a pty (Enter is CR); without one, lines end with LF.
    pty: bool,
    last_cr: bool,
}

impl LineEditor {
    /// An editor for a channel with (`pty`) or without a terminal.
    pub fn new(pty: bool) -> LineEditor {
        LineEditor {
            pty,
            ..LineEditor::default()
        }
    }

    /// Tells the editor about output from the host: alternate-screen
    /// switches and password prompts.
    pub fn saw_output(&mut self, out: &[u8]) {
        for (on, seq) in [
            (true, &b"\x1b[?1049h"[..]),
            (true, b"\x1b[?1047h"),
            (true, b"\x1b[?47h"),
            (false, b"\x1b[?1049l"),
            (false, b"\x1b[?1047l"),
            (false, b"\x1b[?47l"),
        ] {
            if out.windows(seq.len()).any(|w| w == seq) {
                self.alternate = on;
            }
        }
        // The last switch in the chunk wins.
        let on = out.windows(8).rposition(|w| w == b"\x1b[?2004h");
        let off = out.windows(8).rposition(|w| w == b"\x1b[?2004l");
        match (on, off) {
            (Some(a), Some(b)) => self.paste_enabled = a > b,
            (Some(_), None) => self.paste_enabled = true,
            (None, Some(_)) => self.paste_enabled = false,
            (None, None) => {}
        }
        if !out.is_empty() {
            self.secret = secret_prompt(out);
        }
    }

    /// Whether lines are being checked now (no full-screen program, no
    /// password prompt).
    pub fn checking(&self) -> bool {
        !self.alternate && !self.secret
    }

    /// Splits a chunk of input into bytes to pass on and completed lines.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, &b) in data.iter().enumerate() {
            let enter = match b {
                // Without a terminal the shell reads lines ending in LF, and
                // every other byte is part of the line as it is.
                _ if !self.pty => b == b'\n',
                // Ctrl-O (readline's operate-and-get-next) runs the line too.
                b'\r' | 0x0f => true,
                // CR LF is one Enter; a lone LF (a pasted line) is one too.
                b'\n' => !self.last_cr,
                _ => false,
            };
            let after_cr = self.last_cr;
            self.last_cr = b == b'\r';
            if self.pty && b == b'\n' && after_cr && self.esc == Esc::None {
                // The LF of a CR LF: part of the Enter already seen.
                continue;
            }
            if enter && self.in_paste && self.esc == Esc::None {
                // A pasted line end: part of the line, run at the real Enter.
                self.push(b'\n');
                continue;
            }
            if enter && self.esc == Esc::None {
                if start < i {
                    out.push(Piece::Bytes(start, i));
                }
                let text = String::from_utf8_lossy(&self.line).into_owned();
                let uncertain = self.uncertain;
                self.line.clear();
                self.uncertain = false;
                if self.checking() {
                    out.push(Piece::Line {
                        text,
                        uncertain,
                        enter: i,
                    });
                } else {
                    // Not a command: an answer to a password prompt, or a key
                    // in a full-screen program.
                    self.secret = false;
                    out.push(Piece::Bytes(i, i + 1));
                }
                start = i + 1;
                continue;
            }
            self.key(b);
        }
        if start < data.len() {
            out.push(Piece::Bytes(start, data.len()));
        }
        out
    }

    fn key(&mut self, b: u8) {
        if !self.pty {
            self.push(b);
            return;
        }
        match self.esc {
            Esc::Start => {
                self.esc = match b {
                    b'[' => {
                        self.csi.clear();
                        Esc::Csi
                    }
                    b'O' => Esc::Ss3,
                    _ => {
                        // Meta-key chords (Alt-b, Alt-d, …) edit the line.
                        self.uncertain = true;
                        Esc::None
                    }
                };
                return;
            }
            Esc::Csi => {
                if (0x40..=0x7e).contains(&b) {
                    self.esc = Esc::None;
                    // Bracketed-paste markers (when the program asked for
                    // them) change nothing but what a line end means.
                    let marker = b == b'~' && (self.csi == b"200" || self.csi == b"201");
                    if marker && self.paste_enabled {
                        self.in_paste = self.csi == b"200";
                    } else {
                        self.uncertain = true;
                    }
                } else if self.csi.len() < 32 {
                    self.csi.push(b);
                }
                return;
            }
            Esc::Ss3 => {
                self.esc = Esc::None;
                self.uncertain = true;
                return;
            }
            Esc::None => {}
        }
        match b {
            0x1b => self.esc = Esc::Start,
            0x7f | 0x08 => {
                // Remove one character (a whole UTF-8 sequence).
                while let Some(c) = self.line.pop() {
                    if c & 0xc0 != 0x80 {
                        break;
                    }
                }
            }
            0x15 | 0x03 => {
                self.line.clear();
                self.uncertain = false;
            }
            0x17 => {
                while self.line.last() == Some(&b' ') {
                    self.line.pop();
                }
                while self.line.last().is_some_and(|c| *c != b' ') {
                    self.line.pop();
                }
            }
            b'\t' => {
                if self.pty {
                    self.uncertain = true;
                } else {
                    self.push(b);
                }
            }
            0x04 if self.line.is_empty() => {}
            b if b < 0x20 => self.uncertain = true,
            b => self.push(b),
        }
    }

    fn push(&mut self, b: u8) {
        if self.line.len() < MAX_LINE {
            self.line.push(b);
        } else {
            self.uncertain = true;
        }
    }
}

/// Whether output ends with a password prompt.
fn secret_prompt(out: &[u8]) -> bool {
    let tail = &out[out.len().saturating_sub(160)..];
    let text = String::from_utf8_lossy(tail).to_lowercase();
    let t = text.trim_end();
    t.ends_with(':')
        && ["password", "passphrase", "passcode", " pin", "token"]
            .iter()
            .any(|w| t.rsplit('\n').next().unwrap_or("").contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(ed: &mut LineEditor, input: &[u8]) -> Vec<(String, bool)> {
        ed.feed(input)
            .into_iter()
            .filter_map(|p| match p {
                Piece::Line {
                    text, uncertain, ..
                } => Some((text, uncertain)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn editing_keys_are_followed() {
        let mut ed = LineEditor::new(true);
        assert_eq!(lines(&mut ed, b"ls -l\r"), [("ls -l".into(), false)]);
        assert_eq!(
            lines(&mut ed, b"rm -rf /tmpx\x7f\r"),
            [("rm -rf /tmp".into(), false)]
        );
        assert_eq!(
            lines(&mut ed, b"junk\x15echo ok\r"),
            [("echo ok".into(), false)]
        );
        assert_eq!(
            lines(&mut ed, b"echo a bad\x17good\r"),
            [("echo a good".into(), false)]
        );
        assert_eq!(lines(&mut ed, b"sleep 1\x03\r"), [(String::new(), false)]);
        // Split over several chunks.
        assert!(lines(&mut ed, b"who").is_empty());
        assert_eq!(lines(&mut ed, b"ami\r"), [("whoami".into(), false)]);
        // UTF-8 and backspace over a multi-byte character.
        assert_eq!(
            lines(&mut ed, "échoé\x7f\r".as_bytes()),
            [("écho".into(), false)]
        );
        // Every key that runs the line ends it: CR, LF, Ctrl-O.
        assert_eq!(lines(&mut ed, b"id\x0f"), [("id".into(), false)]);
    }

    #[test]
    fn keys_the_gate_cannot_follow_make_the_line_uncertain() {
        let mut ed = LineEditor::new(true);
        assert_eq!(lines(&mut ed, b"\x1b[A\r"), [(String::new(), true)]);
        assert_eq!(
            lines(&mut ed, b"rm -rf /e\t\r"),
            [("rm -rf /e".into(), true)]
        );
        assert_eq!(lines(&mut ed, b"ls\r"), [("ls".into(), false)]);
        // Bracketed paste, when the program asked for it, is not an edit,
        // and a pasted line end is part of the line the real Enter runs.
        ed.saw_output(b"\x1b[?2004h$ ");
        assert_eq!(
            lines(&mut ed, b"\x1b[200~id\x1b[201~\r"),
            [("id".into(), false)]
        );
        assert_eq!(
            lines(&mut ed, b"\x1b[200~rm -rf /etc\necho hi\x1b[201~\r"),
            [("rm -rf /etc\necho hi".into(), false)]
        );
        // Markers the program did not ask for do not hide line ends.
        ed.saw_output(b"\x1b[?2004l");
        assert_eq!(
            lines(&mut ed, b"\x1b[200~\nrm -rf /etc\n"),
            [(String::new(), true), ("rm -rf /etc".into(), false)]
        );
    }

    #[test]
    fn pieces_keep_the_bytes_in_order() {
        let mut ed = LineEditor::new(true);
        let p = ed.feed(b"ab\rcd");
        assert_eq!(
            p,
            [
                Piece::Bytes(0, 2),
                Piece::Line {
                    text: "ab".into(),
                    uncertain: false,
                    enter: 2
                },
                Piece::Bytes(3, 5)
            ]
        );
    }

    #[test]
    fn password_prompts_and_full_screen_programs_are_not_commands() {
        let mut ed = LineEditor::new(true);
        ed.saw_output(b"[sudo] password for ada: ");
        assert!(lines(&mut ed, b"hunter2\r").is_empty());
        ed.saw_output(b"\r\n$ ");
        assert_eq!(lines(&mut ed, b"id\r").len(), 1);
        ed.saw_output(b"\x1b[?1049h\x1b[1;1H");
        assert!(lines(&mut ed, b"ihello\x1b:wq\r").is_empty());
        ed.saw_output(b"\x1b[?1049l$ ");
        assert_eq!(lines(&mut ed, b"ls\r").len(), 1);
    }

    #[test]
    fn without_a_terminal_lines_end_with_newlines() {
        let mut ed = LineEditor::new(false);
        assert_eq!(
            lines(&mut ed, b"echo a\nrm -rf /\n"),
            [("echo a".into(), false), ("rm -rf /".into(), false)]
        );
        let mut ed = LineEditor::new(false);
        // Without a terminal nothing is an editing key: the line is the bytes.
        assert_eq!(
            lines(&mut ed, b"echo a\r\nrm x\x7f\n"),
            [("echo a\r".into(), false), ("rm x\u{7f}".into(), false)]
        );
    }
}
