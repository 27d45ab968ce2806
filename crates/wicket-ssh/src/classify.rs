//! Shell commands, classified: the words of a command line as a POSIX shell
//! splits them, the simple commands of its lists and pipelines, and the risky
//! patterns found in them, with a risk score.
//!
//! The parse is the shell's own tokenising (quotes, backslashes, operators,
//! command substitution); it does not expand variables or globs, so a
//! command that hides its program behind `$X` or `eval` is classified by the
//! words as written (and `eval`, `sh -c`, `bash -c` are parsed again inside).
//!
//! Kinds, from the riskiest: `destroy` (recursive or forced removal of a
//! system path, writes over a block device, `shred`), `disk` (partitioning,
//! file systems, mounts), `remote_code` (a download piped into an
//! interpreter), `firewall`, `privilege` (sudo, su, setuid bits, user and
//! group changes), `service` (systemctl, reboot, kill), `package`, `write`
//! (file changes), `read`, and `exec` for anything else.

use wicket_core::Classification;

/// Kinds with their risk scores, riskiest first.
const KINDS: [(&str, u32); 10] = [
    ("destroy", 95),
    ("disk", 90),
    ("remote_code", 90),
    ("firewall", 80),
    ("privilege", 70),
    ("service", 60),
    ("package", 50),
    ("write", 35),
    ("exec", 25),
    ("read", 10),
];

fn risk_of(kind: &str) -> u32 {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, r)| *r)
        .unwrap_or(25)
}

/// One simple command: its words, and what connects it to the next one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Simple {
    /// The words, quotes removed.
    pub argv: Vec<String>,
    /// Whether the output of this command is piped into the next one.
    pub piped: bool,
    /// Files this command writes by redirection (`>`, `>>`).
    pub writes: Vec<String>,
}

/// Splits a command line into simple commands (`;`, `&&`, `||`, `|`, `&`,
/// newlines; the insides of `$(…)` and backquotes become commands too).
pub fn parse(line: &str) -> Vec<Simple> {
    let mut out = Vec::new();
    parse_into(line, &mut out, 0);
    out
}

fn parse_into(line: &str, out: &mut Vec<Simple>, depth: usize) {
    if depth > 8 {
        return;
    }
    let mut cur = Simple::default();
    let mut word = String::new();
    let mut in_word = false;
    let mut redirect = false;
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    let finish_word =
        |word: &mut String, in_word: &mut bool, cur: &mut Simple, redirect: &mut bool| {
            if *in_word {
                let w = std::mem::take(word);
                if *redirect {
                    cur.writes.push(w);
                    *redirect = false;
                } else {
                    cur.argv.push(w);
                }
                *in_word = false;
            }
        };
    let finish_cmd = |cur: &mut Simple, piped: bool, out: &mut Vec<Simple>| {
        cur.piped = piped;
        if !cur.argv.is_empty() || !cur.writes.is_empty() {
            out.push(std::mem::take(cur));
        } else {
            *cur = Simple::default();
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                if let Some(&n) = chars.get(i + 1) {
                    if n != '\n' {
                        word.push(n);
                        in_word = true;
                    }
                    i += 2;
                } else {
                    i += 1;
                }
                continue;
            }
            '\'' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    word.push(chars[i]);
                    i += 1;
                }
                i += 1;
                continue;
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\'
                        && let Some(&n) = chars.get(i + 1)
                        && matches!(n, '"' | '\\' | '$' | '`')
                    {
                        word.push(n);
                        i += 2;
                        continue;
                    }
                    if chars[i] == '$' && chars.get(i + 1) == Some(&'(') {
                        let (inner, end) = balanced(&chars, i + 2);
                        parse_into(&inner, out, depth + 1);
                        word.push_str("$(");
                        word.push_str(&inner);
                        word.push(')');
                        i = end;
                        continue;
                    }
                    word.push(chars[i]);
                    i += 1;
                }
                i += 1;
                continue;
            }
            '$' if chars.get(i + 1) == Some(&'(') => {
                let (inner, end) = balanced(&chars, i + 2);
                parse_into(&inner, out, depth + 1);
                word.push_str("$(");
                word.push_str(&inner);
                word.push(')');
                in_word = true;
                i = end;
                continue;
            }
            '`' => {
                let start = i + 1;
                let mut end = start;
                while end < chars.len() && chars[end] != '`' {
                    end += 1;
                }
                let inner: String = chars[start..end.min(chars.len())].iter().collect();
                parse_into(&inner, out, depth + 1);
                word.push('`');
                word.push_str(&inner);
                word.push('`');
                in_word = true;
                i = end + 1;
                continue;
            }
            '#' if !in_word => {
                // A comment runs to the end of the line.
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            c if c.is_whitespace() && c != '\n' => {
                finish_word(&mut word, &mut in_word, &mut cur, &mut redirect);
            }
            '>' => {
                finish_word(&mut word, &mut in_word, &mut cur, &mut redirect);
                // `2>`, `&>`: the digit was taken as a word; drop it.
                if cur
                    .argv
                    .last()
                    .is_some_and(|w| w.len() == 1 && w.chars().all(|d| d.is_ascii_digit()))
                {
                    cur.argv.pop();
                }
                while chars.get(i + 1) == Some(&'>') || chars.get(i + 1) == Some(&'|') {
                    i += 1;
                }
                if chars.get(i + 1) == Some(&'&') {
                    // `>&2`: a descriptor, not a file.
                    i += 2;
                    while chars
                        .get(i)
                        .is_some_and(|d| d.is_ascii_digit() || *d == '-')
                    {
                        i += 1;
                    }
                    continue;
                }
                redirect = true;
            }
            '<' => {
                finish_word(&mut word, &mut in_word, &mut cur, &mut redirect);
                // An input redirection's word is not an argument; read and drop it.
                while chars.get(i + 1) == Some(&'<') {
                    i += 1;
                }
                i += 1;
                while chars.get(i).is_some_and(|c| c.is_whitespace()) {
                    i += 1;
                }
                while chars
                    .get(i)
                    .is_some_and(|c| !c.is_whitespace() && !";&|".contains(*c))
                {
                    i += 1;
                }
                continue;
            }
            '|' => {
                finish_word(&mut word, &mut in_word, &mut cur, &mut redirect);
                if chars.get(i + 1) == Some(&'|') {
                    finish_cmd(&mut cur, false, out);
                    i += 1;
                } else {
                    if chars.get(i + 1) == Some(&'&') {
                        i += 1;
                    }
                    finish_cmd(&mut cur, true, out);
                }
            }
            ';' | '&' | '\n' | '(' | ')' | '{' | '}' if !in_word || c != '{' && c != '}' => {
                finish_word(&mut word, &mut in_word, &mut cur, &mut redirect);
                if c == '&' && chars.get(i + 1) == Some(&'>') {
                    // `&>file`
                    i += 1;
                    while chars.get(i + 1) == Some(&'>') {
                        i += 1;
                    }
                    redirect = true;
                } else {
                    finish_cmd(&mut cur, false, out);
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
        i += 1;
    }
    finish_word(&mut word, &mut in_word, &mut cur, &mut redirect);
    finish_cmd(&mut cur, false, out);
}

/// The text of a `$(…)` starting at `start` (just after the parenthesis),
/// and the index just after its closing parenthesis.
fn balanced(chars: &[char], start: usize) -> (String, usize) {
    let mut depth = 1;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return (chars[start..i].iter().collect(), i + 1);
                }
            }
            '\'' => {
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    (chars[start..].iter().collect(), chars.len())
}

/// The program a simple command runs, past wrappers such as `sudo`, `env`,
/// `nohup`, `time`, `nice`, `xargs` (returned separately as privilege).
fn program(argv: &[String]) -> (Option<usize>, bool) {
    let mut i = 0;
    let mut privileged = false;
    while i < argv.len() {
        let w = &argv[i];
        // Assignments before the command (`A=b cmd`).
        if !w.starts_with('-') && w.contains('=') && !w.starts_with('=') && i == 0 {
            i += 1;
            continue;
        }
        let name = base(w);
        match name {
            "sudo" | "doas" | "pkexec" | "run0" => {
                privileged = true;
                i += 1;
                // Options of sudo; `-u user` and `-g group` take a value.
                while i < argv.len() && argv[i].starts_with('-') {
                    if matches!(
                        argv[i].as_str(),
                        "-u" | "-g" | "-C" | "-D" | "-h" | "-p" | "-r" | "-t" | "-U"
                    ) {
                        i += 1;
                    }
                    i += 1;
                }
            }
            "env" | "nohup" | "time" | "nice" | "ionice" | "stdbuf" | "timeout" | "exec"
            | "command" | "builtin" | "xargs" | "setsid" | "chroot" => {
                i += 1;
                while i < argv.len()
                    && (argv[i].starts_with('-')
                        || argv[i].contains('=')
                        || (name == "timeout"
                            && argv[i].chars().next().is_some_and(|c| c.is_ascii_digit()))
                        || (name == "nice" && argv[i].parse::<i32>().is_ok()))
                {
                    i += 1;
                }
                if name == "chroot" && i < argv.len() {
                    // chroot's first operand is the new root.
                    i += 1;
                }
            }
            _ => return (Some(i), privileged),
        }
    }
    (None, privileged)
}

/// The last path component of a program word (`/usr/bin/rm` → `rm`).
fn base(w: &str) -> &str {
    w.rsplit('/').next().unwrap_or(w)
}

const INTERPRETERS: [&str; 12] = [
    "sh", "bash", "zsh", "dash", "ksh", "fish", "python", "python3", "perl", "ruby", "node", "php",
];

/// System paths: a recursive or forced delete of one of these (or of
/// anything right under `/`) destroys the host.
const SYSTEM: [&str; 16] = [
    "/", "/*", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/root",
    "/sbin", "/srv", "/usr", "/var", "~",
];

fn system_path(p: &str) -> bool {
    let t = p.trim_end_matches('/');
    let t = if t.is_empty() { "/" } else { t };
    SYSTEM.contains(&t)
        || t == "/*"
        || t.starts_with("/*")
        || (t.starts_with('/') && t.matches('/').count() == 1 && t.ends_with('*'))
        || t == "$HOME"
        || t == "~/"
        || t.starts_with("/etc/")
        || t.starts_with("/boot/")
        || t.starts_with("/usr/")
        || t.starts_with("/var/lib/")
}

/// The kind of one simple command (and whether it needs privilege).
fn kind_of(
    s: &Simple,
    next: Option<&Simple>,
    prev_piped_from_download: bool,
) -> (&'static str, Option<String>) {
    let (idx, privileged) = program(&s.argv);
    let Some(idx) = idx else {
        return (
            if privileged {
                "privilege"
            } else if s.writes.is_empty() {
                "exec"
            } else {
                "write"
            },
            None,
        );
    };
    let prog = base(&s.argv[idx]).to_string();
    let args = &s.argv[idx + 1..];
    let flags: String = args
        .iter()
        .filter(|a| a.starts_with('-') && !a.starts_with("--"))
        .flat_map(|a| a.chars().skip(1))
        .collect();
    let long = |f: &str| args.iter().any(|a| a == f);
    let operands: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let mut kind = match prog.as_str() {
        "rm" => {
            let recursive = flags.contains('r') || flags.contains('R') || long("--recursive");
            let force = flags.contains('f') || long("--force");
            if (recursive || force) && operands.iter().any(|p| system_path(p))
                || long("--no-preserve-root")
            {
                "destroy"
            } else {
                "write"
            }
        }
        "shred" | "wipefs" => "destroy",
        "dd" => {
            if args.iter().any(|a| a.starts_with("of=/dev/")) {
                "destroy"
            } else {
                "write"
            }
        }
        "mkfs" | "fdisk" | "sfdisk" | "gdisk" | "sgdisk" | "parted" | "mkswap" | "swapon"
        | "swapoff" | "mount" | "umount" | "lvcreate" | "lvremove" | "vgremove" | "pvremove"
        | "cryptsetup" | "losetup" | "blkdiscard" | "zpool" => "disk",
        p if p.starts_with("mkfs.") => "disk",
        "iptables" | "ip6tables" | "iptables-restore" | "ip6tables-restore" | "nft" | "ufw"
        | "firewall-cmd" | "ebtables" | "arptables" => "firewall",
        "su" | "passwd" | "useradd" | "userdel" | "usermod" | "groupadd" | "groupdel"
        | "gpasswd" | "visudo" | "chpasswd" | "setcap" => "privilege",
        "chmod" => {
            if args.iter().any(|a| {
                a.contains('s')
                    && (a.starts_with('+') || a.starts_with("u+") || a.starts_with("g+"))
                    || a.len() == 4 && a.starts_with(['2', '4', '6'])
            }) {
                "privilege"
            } else {
                "write"
            }
        }
        "chown" | "chgrp" => {
            if operands.iter().skip(1).any(|p| system_path(p))
                && (flags.contains('R') || long("--recursive"))
            {
                "destroy"
            } else {
                "write"
            }
        }
        "systemctl" | "service" | "shutdown" | "reboot" | "halt" | "poweroff" | "init"
        | "telinit" | "kill" | "killall" | "pkill" | "crontab" | "at" => "service",
        "apt" | "apt-get" | "dpkg" | "yum" | "dnf" | "rpm" | "apk" | "pip" | "pip3" | "npm"
        | "snap" | "zypper" | "pacman" => "package",
        "cp" | "mv" | "tee" | "touch" | "mkdir" | "rmdir" | "ln" | "truncate" | "install"
        | "rsync" | "scp" | "sed" | "tar" | "unzip" | "git" | "patch" => {
            if prog == "sed"
                && !(flags.contains('i') || args.iter().any(|a| a.starts_with("--in-place")))
            {
                "read"
            } else {
                "write"
            }
        }
        "cat" | "ls" | "head" | "tail" | "less" | "more" | "grep" | "egrep" | "find" | "stat"
        | "wc" | "df" | "du" | "ps" | "top" | "uptime" | "whoami" | "id" | "hostname" | "uname"
        | "date" | "echo" | "printf" | "pwd" | "which" | "file" | "sort" | "uniq" | "cut"
        | "awk" | "jq" | "journalctl" | "free" | "env" | "printenv" | "true" | "false"
        | "sleep" | "test" | "[" | "diff" | "md5sum" | "sha256sum" | "base64" | "tr" | "seq"
        | "yes" | "ss" | "netstat" | "lsof" | "dmesg" => "read",
        _ => "exec",
    };
    // A download piped into an interpreter runs code nobody reviewed.
    if (prog == "curl" || prog == "wget")
        && s.piped
        && let Some(n) = next
        && let (Some(ni), _) = program(&n.argv)
        && INTERPRETERS.contains(&base(&n.argv[ni]))
    {
        kind = "remote_code";
    }
    if INTERPRETERS.contains(&prog.as_str())
        && (prev_piped_from_download
            || args.iter().any(|a| {
                ["$(curl", "$(wget", "`curl", "`wget"]
                    .iter()
                    .any(|d| a.contains(d))
            }))
    {
        kind = "remote_code";
    }
    // Redirections over devices or system files.
    if s.writes
        .iter()
        .any(|w| w.starts_with("/dev/sd") || w.starts_with("/dev/nvme") || w.starts_with("/dev/vd"))
    {
        kind = "destroy";
    } else if s
        .writes
        .iter()
        .any(|w| w != "/dev/null" && w != "/dev/stderr" && w != "/dev/stdout")
        && risk_of(kind) < risk_of("write")
    {
        kind = "write";
    }
    if privileged && risk_of(kind) < risk_of("privilege") {
        kind = "privilege";
    }
    (kind, Some(prog))
}

/// Classifies a command line (an `exec` request, or a line typed in a shell).
pub fn classify(line: &str) -> Classification {
    let mut commands = parse(line);
    // `sh -c '…'`, `bash -c`, `eval`: the inner text is a command line too.
    let mut extra = Vec::new();
    for s in &commands {
        if let (Some(i), _) = program(&s.argv) {
            let prog = base(&s.argv[i]);
            if INTERPRETERS[..6].contains(&prog)
                && let Some(pos) = s.argv[i + 1..].iter().position(|a| {
                    a == "-c" || a.starts_with('-') && a.ends_with('c') && !a.starts_with("--")
                })
                && let Some(inner) = s.argv.get(i + 2 + pos)
            {
                extra.extend(parse(inner));
            } else if prog == "eval" {
                extra.extend(parse(&s.argv[i + 1..].join(" ")));
            }
        }
    }
    commands.extend(extra);
    let mut best: (&str, Option<String>) = ("exec", None);
    let mut first_prog = None;
    let mut objects = Vec::new();
    let mut prev_download = false;
    for (i, s) in commands.iter().enumerate() {
        let (kind, prog) = kind_of(s, commands.get(i + 1), prev_download);
        prev_download = s.piped && prog.as_deref().is_some_and(|p| p == "curl" || p == "wget");
        if first_prog.is_none() {
            first_prog = prog.clone();
        }
        if best.1.is_none() || risk_of(kind) > risk_of(best.0) {
            best = (kind, prog);
        }
        let (idx, _) = program(&s.argv);
        if let Some(idx) = idx {
            for a in &s.argv[idx + 1..] {
                if (a.starts_with('/') || a.starts_with("~/") || a.starts_with("./"))
                    && !objects.contains(a)
                    && objects.len() < 32
                {
                    objects.push(a.clone());
                }
            }
        }
        for w in &s.writes {
            if !objects.contains(w) && objects.len() < 32 {
                objects.push(w.clone());
            }
        }
    }
    let argv = commands.first().map(|s| s.argv.clone()).unwrap_or_default();
    let verb = best.1.or(first_prog).unwrap_or_default();
    let mut risk = risk_of(best.0);
    if commands.len() > 1 {
        risk = (risk + 5).min(100);
    }
    Classification {
        kind: best.0.to_string(),
        verb,
        objects,
        argv,
        risk,
        fingerprint: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(line: &str) -> String {
        classify(line).kind
    }

    #[test]
    fn words_split_as_a_shell_splits_them() {
        let p = parse(r#"echo 'a b' "c \"d\"" e\ f; ls -l | wc -l && rm x > out 2>&1"#);
        assert_eq!(p[0].argv, ["echo", "a b", "c \"d\"", "e f"]);
        assert_eq!(p[1].argv, ["ls", "-l"]);
        assert!(p[1].piped);
        assert_eq!(p[2].argv, ["wc", "-l"]);
        assert_eq!(p[3].argv, ["rm", "x"]);
        assert_eq!(p[3].writes, ["out"]);
    }

    #[test]
    fn risky_patterns_are_found() {
        for (line, want) in [
            ("rm -rf /", "destroy"),
            ("rm -rf /etc", "destroy"),
            ("sudo rm -fr --no-preserve-root /", "destroy"),
            ("rm -r /var/lib/postgresql", "destroy"),
            ("rm -rf ./build", "write"),
            ("rm notes.txt", "write"),
            ("dd if=/dev/zero of=/dev/sda bs=1M", "destroy"),
            ("cat /dev/zero > /dev/sda", "destroy"),
            ("mkfs.ext4 /dev/sdb1", "disk"),
            (
                "curl -fsSL https://x.example/install.sh | sh",
                "remote_code",
            ),
            (
                "wget -qO- https://x.example/i | sudo bash -s",
                "remote_code",
            ),
            (
                "bash -c \"$(curl -fsSL https://x.example/i)\"",
                "remote_code",
            ),
            ("iptables -F", "firewall"),
            ("sudo ufw disable", "firewall"),
            ("sudo -u postgres psql", "privilege"),
            ("su -", "privilege"),
            ("chmod u+s /bin/bash", "privilege"),
            ("chmod 4755 /tmp/x", "privilege"),
            ("systemctl stop nginx", "service"),
            ("apt-get install -y htop", "package"),
            ("ls -la /etc", "read"),
            ("uptime", "read"),
            ("sh -c 'rm -rf /'", "destroy"),
            ("eval rm -rf /usr", "destroy"),
            ("echo $(rm -rf /)", "destroy"),
            ("env FOO=1 nohup rm -rf /srv", "destroy"),
            ("/usr/bin/python3 script.py", "exec"),
        ] {
            assert_eq!(kind(line), want, "{line}");
        }
    }

    #[test]
    fn verb_names_the_program_that_decided() {
        // sudo makes it a privileged command; the verb is what it runs.
        let c = classify("ls /tmp; sudo systemctl restart nginx");
        assert_eq!(c.kind, "privilege");
        assert_eq!(c.verb, "systemctl");
        assert_eq!(c.argv, ["ls", "/tmp"]);
        assert!(c.risk > risk_of("privilege"));
        assert_eq!(classify("systemctl restart nginx").kind, "service");
        assert_eq!(classify("exit 3").verb, "exit");
        assert_eq!(classify("").kind, "exec");
    }

    #[test]
    fn nothing_panics_on_odd_input() {
        for line in [
            "'", "\"", "$(", "`", "\\", "a |", "| b", ">", "2>&", "((((", "$($($(", "{ a; }",
            "a&&&b",
        ] {
            let _ = classify(line);
        }
    }
}
