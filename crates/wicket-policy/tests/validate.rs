//! Bad documents are refused with file, line and field.

use wicket_policy::parse_and_compile;

fn errors(src: &str) -> Vec<(u32, String, String)> {
    match parse_and_compile(src, "bad.yaml") {
        Ok(_) => panic!("accepted:\n{src}"),
        Err(e) => {
            e.0.into_iter()
                .map(|e| {
                    assert_eq!(e.source_name, "bad.yaml");
                    (e.line, e.field, e.message)
                })
                .collect()
        }
    }
}

const BASE: &str = "connections:\n  - name: db\n    protocol: postgres\n";

#[test]
fn invalid_documents_name_line_and_field() {
    // (document, line, field, message fragment)
    let cases: Vec<(String, u32, &str, &str)> = vec![
        ("".into(), 1, "", "empty"),
        ("rules: [\n  {id: x\n".into(), 3, "", ""),
        ("version: 2\n".into(), 1, "version", "unsupported version"),
        (
            "conections: []\n".into(),
            1,
            "conections",
            "unknown field `conections`",
        ),
        (
            format!("{BASE}    protocl: x\n"),
            4,
            "connections[0].protocl",
            "unknown field `protocl`",
        ),
        (
            "connections:\n  - name: db\n    protocol: ftp\n".into(),
            3,
            "connections[0].protocol",
            "unknown variant `ftp`",
        ),
        (
            format!("{BASE}rules:\n  - id: r1\n    effect: maybe\n"),
            6,
            "rules[0].effect",
            "unknown variant `maybe`",
        ),
        (
            format!(
                "{BASE}rules:\n  - id: r1\n    effect: allow\n    condition: 'command.risk >'\n"
            ),
            7,
            "rules[0].condition",
            "invalid CEL",
        ),
        (
            format!(
                "{BASE}rules:\n  - id: r1\n    effect: allow\n    condition: 'user.name == \"x\"'\n"
            ),
            7,
            "rules[0].condition",
            "unknown variable(s) user",
        ),
        (
            format!("{BASE}rules:\n  - id: r1\n    effect: review\n"),
            6,
            "rules[0].effect",
            "review rule needs",
        ),
        (
            format!("{BASE}rules:\n  - id: r1\n    effect: allow\n  - id: r1\n    effect: deny\n"),
            7,
            "rules[1].id",
            "duplicate rule id",
        ),
        (
            format!(
                "{BASE}rules:\n  - id: r1\n    effect: allow\n    match: {{connections: [nope]}}\n"
            ),
            7,
            "rules[0].match.connections[0]",
            "unknown connection `nope`",
        ),
        (
            format!("{BASE}grants:\n  - id: g\n    connections: [db]\n"),
            5,
            "grants[0]",
            "would grant nobody",
        ),
        (
            format!("{BASE}grants:\n  - id: g\n    groups: [x]\n    expires: yesterday\n"),
            7,
            "grants[0].expires",
            "input contains invalid characters",
        ),
        (
            format!("{BASE}    masking: {{detectors: [emial]}}\n"),
            4,
            "connections[0].masking.detectors[0]",
            "unknown detector `emial`",
        ),
        (
            format!("{BASE}    masking: {{columns: [{{column: users.email}}]}}\n"),
            4,
            "connections[0].masking.columns[0].column",
            "not schema.table.column",
        ),
        (
            "detectors:\n  - name: badge\n    regex: '(unclosed'\n".into(),
            3,
            "detectors[0].regex",
            "invalid regex",
        ),
        (
            format!(
                "{BASE}rules:\n  - id: r1\n    effect: review\n    review: {{approvers: [a], timeout: 1w}}\n"
            ),
            7,
            "rules[0].review.timeout",
            "invalid duration",
        ),
        ("a: 1\na: 2\n".into(), 2, "", "duplicate key"),
    ];
    for (src, line, field, msg) in cases {
        let errs = errors(&src);
        let found = errs
            .iter()
            .any(|(l, f, m)| *l == line && f == field && m.contains(msg));
        assert!(
            found,
            "document:\n{src}\nwanted line {line} field `{field}` ~ `{msg}`, got {errs:#?}"
        );
    }
}

#[test]
fn every_error_is_reported_at_once() {
    let src = format!(
        "{BASE}rules:\n  - id: r1\n    effect: allow\n    condition: 'x >'\n  - id: 'bad id'\n    effect: deny\n"
    );
    let errs = errors(&src);
    assert_eq!(errs.len(), 2, "{errs:#?}");
}

#[test]
fn errors_display_as_file_line_column_field() {
    let e = parse_and_compile("version: 3\n", "p.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "p.yaml:1:10: version: unsupported version 3 (expected 1)"
    );
}

#[test]
fn review_reuse_is_bounded() {
    let rule = |reuse: &str| {
        format!(
            "{BASE}rules:\n  - id: r1\n    effect: review\n    review: {{approvers: [dba], reuse_for: {reuse}}}\n"
        )
    };
    let errs = errors(&rule("8d"));
    assert!(
        errs.iter()
            .any(|(_, f, m)| f.ends_with("review.reuse_for") && m.contains("at most 7d")),
        "{errs:#?}"
    );
    assert!(parse_and_compile(&rule("30m"), "ok.yaml").is_ok());
}
