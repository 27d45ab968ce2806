//! Masking of what the server sends back: rows, errors, notices and
//! notifications.
//!
//! A connection's `masking` policy names columns (`schema.table.column`
//! globs) and content detectors. Columns are recognised from RowDescription:
//! its table OID and attribute number are resolved through the server's own
//! catalog (a side connection per database, with the gate's credentials;
//! cached, and forgotten after any DDL), so a column is masked whatever the
//! query calls it. Detectors run on every text value.
//!
//! What a masked value becomes depends on its type, so that every client
//! (text or binary format) still decodes every row:
//! - text-like types (`text`, `varchar`, `char`, `name`, `unknown`): the
//!   replacement text, in either format (their binary form is the text);
//! - `json` and `jsonb`: the replacement as a JSON string (binary `jsonb`
//!   keeps its version byte);
//! - any other type (numbers, dates, `uuid`, `bytea`, arrays in binary…):
//!   NULL, the one value every type and format can carry. A content
//!   detector hit in the text form of such a value makes it NULL too.
//!
//! In the extended protocol the gate asks the server to describe each portal
//! right before it is executed (a Describe the client never sees), so the
//! rows are always read with the formats the client asked for at Bind.
//! Fails closed: a column whose table could not be resolved is NULL.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use wicket_mask::{Counts, Masker, Style};

/// Values masked, by detector name or by masked column (`schema.table.column`).
pub type Tally = BTreeMap<String, u64>;

fn tally(t: &mut Tally, c: &Counts) {
    for (k, n) in c.iter() {
        bump(t, k, n);
    }
}

/// Adds `n` to `k` (allocating the key only the first time).
fn bump(t: &mut Tally, k: &str, n: u64) {
    match t.get_mut(k) {
        Some(v) => *v += n,
        None => {
            t.insert(k.to_string(), n);
        }
    }
}
use wicket_policy::Policy;
use wicket_sidecar::bundle::Bundle;

use crate::codec;
use crate::upstream::{self, UpstreamConfig};

const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const BPCHAR: u32 = 1042;
const NAME: u32 = 19;
const UNKNOWN: u32 = 705;
const JSON: u32 = 114;
const JSONB: u32 = 3802;
/// Arrays of text-like types: their text form stays a valid literal when an
/// element is replaced (the replacement has no quote, comma, brace or space).
const TEXT_ARRAYS: [u32; 4] = [1009, 1015, 1014, 1003];

use wicket_sidecar::masking::style;

/// The compiled masking of one connection under one bundle.
pub struct Plan {
    masker: Masker,
    /// `(schema, table, column)` globs and their style.
    columns: Vec<([String; 3], Style)>,
    detectors: bool,
    /// Refuse statements that derive results from masked columns.
    pub strict: bool,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("columns", &self.columns.len())
            .field("detectors", &self.detectors)
            .finish()
    }
}

impl Plan {
    /// The plan of `connection` under `policy`; `None` when it masks nothing.
    pub fn compile(policy: &Policy, connection: &str, key: &[u8]) -> Result<Option<Plan>, String> {
        let Some(conn) = policy.connection(connection) else {
            return Ok(None);
        };
        let spec = &conn.masking;
        if spec.columns.is_empty() && spec.detectors.is_empty() {
            return Ok(None);
        }
        let b = wicket_sidecar::masking::builder(policy, connection, key)?;
        let masker = b.build().map_err(|e| e.to_string())?;
        let columns = spec
            .columns
            .iter()
            .filter_map(|c| {
                let mut parts = c.column.splitn(3, '.');
                let p = [
                    parts.next()?.to_string(),
                    parts.next()?.to_string(),
                    parts.next()?.to_string(),
                ];
                Some((p, style(c.style)))
            })
            .collect();
        Ok(Some(Plan {
            masker,
            columns,
            detectors: !spec.detectors.is_empty(),
            strict: spec.strict,
        }))
    }

    /// `text` with the detectors applied (for audit records).
    pub fn mask_text(&self, text: &str) -> String {
        if self.detectors {
            self.masker.mask(text).0.into_owned()
        } else {
            text.to_string()
        }
    }

    /// Whether any column rule exists.
    pub fn has_columns(&self) -> bool {
        !self.columns.is_empty()
    }

    /// Whether `schema.table.column` is masked by a column rule.
    pub fn masks(&self, schema: &str, table: &str, column: &str) -> bool {
        self.column_rule(schema, table, column).is_some()
    }

    /// A masked column of `schema.table` (its rule's column pattern), if any.
    pub fn masked_column_of(&self, schema: &str, table: &str) -> Option<String> {
        use wicket_policy::glob::matches;
        self.columns
            .iter()
            .find(|([s, t, _], _)| matches(s, schema) && matches(t, table))
            .map(|([_, _, c], _)| c.clone())
    }

    fn column_rule(&self, schema: &str, table: &str, column: &str) -> Option<usize> {
        use wicket_policy::glob::matches;
        self.columns.iter().position(|([s, t, c], _)| {
            matches(s, schema) && matches(t, table) && matches(c, column)
        })
    }
}

/// Where a column's values come from, as far as masking goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Not a masked column (detectors may still apply).
    None,
    /// Masked by column rule `i`, named `label`.
    Column(usize),
    /// Its table could not be resolved: NULL (fail closed).
    Unresolved,
}

#[derive(Debug, Clone)]
struct Col {
    rule: Rule,
    label: String,
    qualified: String,
    /// The replacement when it does not depend on the value (redaction).
    fixed: Option<Vec<u8>>,
    type_oid: u32,
    binary: bool,
}

/// The shape of the rows being sent, from the last RowDescription.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    cols: Vec<Col>,
}

/// Shapes of one session's bound statements by `(statement, result
/// formats)`, so that a statement executed again needs no Describe. The
/// unnamed statement is forgotten at every Parse of it, a named one when it
/// is closed, all of them after DDL (their columns may have changed).
#[derive(Default)]
pub struct Shapes {
    by_key: Mutex<HashMap<crate::results::ShapeKey, (Arc<Shape>, u64)>>,
}

/// Shapes a session remembers; past this it starts over.
const SHAPES: usize = 256;

impl Shapes {
    /// The shape of `key`, if known under catalog `generation`.
    pub fn get(&self, key: &crate::results::ShapeKey, generation: u64) -> Option<Arc<Shape>> {
        let g = self.by_key.lock().expect("shapes");
        g.get(key)
            .filter(|(_, gen_)| *gen_ == generation)
            .map(|(s, _)| s.clone())
    }

    /// Remembers `key`'s shape.
    pub fn put(&self, key: crate::results::ShapeKey, shape: Arc<Shape>, generation: u64) {
        let mut g = self.by_key.lock().expect("shapes");
        if g.len() >= SHAPES {
            g.clear();
        }
        g.insert(key, (shape, generation));
    }

    /// Forgets every shape of `statement` (parsed again, or closed).
    pub fn forget(&self, statement: &str) {
        self.by_key
            .lock()
            .expect("shapes")
            .retain(|(s, _), _| s != statement);
    }
}

/// One database's columns, resolved through its catalog.
#[derive(Default)]
struct Catalog {
    /// `(table oid, attnum)` → `(schema.table.column, rule)`; a table
    /// resolved once has all its columns here.
    columns: HashMap<(u32, i16), (String, Option<usize>)>,
    tables: std::collections::HashSet<u32>,
    generation: u64,
}

/// A cached view lookup: the catalog generation and the definition.
type ViewEntry = (u64, Option<String>);

/// A bundle and the plan compiled from it.
type PlanFor = (Arc<Bundle>, Option<Arc<Plan>>);

/// A column's new value: `None` keeps it, `Some(None)` is NULL.
type NewValue = Option<Option<Vec<u8>>>;

/// Masking state shared by the gate's sessions.
#[derive(Default)]
pub struct Masking {
    plan: Mutex<Option<PlanFor>>,
    catalogs: Mutex<HashMap<String, Catalog>>,
    /// Bumped by DDL: every cached column is resolved again.
    generation: AtomicU64,
    /// `(database, schema, name)` → the view's definition (None: not a view).
    views: Mutex<HashMap<(String, String, String), ViewEntry>>,
    key: Vec<u8>,
}

impl std::fmt::Debug for Masking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Masking")
    }
}

impl Masking {
    /// Masking with `key` for keyed hashes (the same key in every replica
    /// makes hashes agree across gates).
    pub fn new(key: Vec<u8>) -> Masking {
        Masking {
            key,
            ..Masking::default()
        }
    }

    /// The plan under `bundle` (compiled once per bundle).
    pub fn plan(&self, bundle: Option<Arc<Bundle>>, connection: &str) -> Option<Arc<Plan>> {
        let bundle = bundle?;
        let mut g = self.plan.lock().expect("plan");
        if let Some((b, p)) = g.as_ref()
            && Arc::ptr_eq(b, &bundle)
        {
            return p.clone();
        }
        let plan = match Plan::compile(&bundle.policy, connection, &self.key) {
            Ok(p) => p.map(Arc::new),
            Err(e) => {
                // The control service compiled this policy, so this should not
                // happen; if it does, fail closed: every detector on, and every
                // column of a table masked.
                tracing::error!(error = %e, "masking policy does not compile in the gate");
                Some(Arc::new(Plan {
                    masker: Masker::builder()
                        .all(Style::Redact)
                        .build()
                        .expect("built-in detectors build"),
                    columns: vec![(["*".into(), "*".into(), "*".into()], Style::Redact)],
                    detectors: true,
                    strict: true,
                }))
            }
        };
        *g = Some((bundle, plan.clone()));
        plan
    }

    /// The definition of `schema.name` in `database` if it is a view
    /// (`Ok(None)` for anything else); cached until DDL.
    pub async fn view_definition(
        &self,
        upstream: &UpstreamConfig,
        database: &str,
        schema: &str,
        name: &str,
    ) -> Result<Option<String>, String> {
        let generation = self.generation();
        let key = (database.to_string(), schema.to_string(), name.to_string());
        if let Some((g, def)) = self.views.lock().expect("views").get(&key)
            && *g == generation
        {
            return Ok(def.clone());
        }
        let sql = format!(
            "SELECT c.relkind::text, pg_catalog.pg_get_viewdef(c.oid), '', '', '' \
             FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass({})",
            relation_literal(schema, name)
        );
        let rows = catalog_query(upstream, database, &sql).await?;
        let def = rows
            .into_iter()
            .find(|r| r[0] == "v" || r[0] == "m")
            .map(|r| r[1].clone());
        let mut views = self.views.lock().expect("views");
        if views.len() >= 4096 {
            views.clear();
        }
        views.insert(key, (generation, def.clone()));
        Ok(def)
    }

    /// Forgets every resolved column (after DDL).
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes with every [`Self::invalidate`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Table OIDs in the RowDescriptions of `buf` that `database`'s catalog
    /// has not resolved yet.
    pub fn unresolved(&self, database: &str, buf: &[u8]) -> Vec<u32> {
        let generation = self.generation.load(Ordering::Relaxed);
        let mut cats = self.catalogs.lock().expect("catalogs");
        let cat = cats.entry(database.to_string()).or_default();
        if cat.generation != generation {
            *cat = Catalog {
                generation,
                ..Catalog::default()
            };
        }
        let mut out = Vec::new();
        for (tag, body) in messages(buf) {
            if tag != b'T' {
                continue;
            }
            for f in fields(body) {
                if f.table != 0 && !cat.tables.contains(&f.table) && !out.contains(&f.table) {
                    out.push(f.table);
                }
            }
        }
        out
    }

    /// Resolves `tables` through `database`'s catalog on a side connection.
    /// On failure the tables stay unresolved and their columns are NULL.
    pub async fn resolve(
        &self,
        plan: &Plan,
        upstream: &UpstreamConfig,
        database: &str,
        tables: &[u32],
    ) {
        if plan.columns.is_empty() || tables.is_empty() {
            return;
        }
        let list: Vec<String> = tables.iter().map(u32::to_string).collect();
        let sql = format!(
            "SELECT a.attrelid, a.attnum, n.nspname, c.relname, a.attname \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE a.attrelid IN ({}) AND a.attnum > 0",
            list.join(",")
        );
        let rows = match catalog_query(upstream, database, &sql).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, database, "cannot resolve masked columns; their values are withheld");
                return;
            }
        };
        let mut cats = self.catalogs.lock().expect("catalogs");
        let cat = cats.entry(database.to_string()).or_default();
        for r in rows {
            let [oid, attnum, schema, table, column] = r;
            let (Ok(oid), Ok(attnum)) = (oid.parse::<u32>(), attnum.parse::<i16>()) else {
                continue;
            };
            let rule = plan.column_rule(&schema, &table, &column);
            cat.columns
                .insert((oid, attnum), (format!("{schema}.{table}.{column}"), rule));
        }
        cat.tables.extend(tables);
    }

    /// The shape of a RowDescription.
    pub fn shape(&self, plan: &Plan, database: &str, body: &[u8]) -> Shape {
        let cats = self.catalogs.lock().expect("catalogs");
        let cat = cats.get(database);
        let cols = fields(body)
            .into_iter()
            .map(|f| {
                let (rule, qualified) = if f.table == 0 || plan.columns.is_empty() {
                    (Rule::None, String::new())
                } else {
                    match cat.and_then(|c| c.columns.get(&(f.table, f.attnum))) {
                        Some((name, Some(i))) => (Rule::Column(*i), name.clone()),
                        Some((_, None)) => (Rule::None, String::new()),
                        None if cat.is_some_and(|c| c.tables.contains(&f.table)) => {
                            (Rule::None, String::new())
                        }
                        None => (Rule::Unresolved, "unresolved".to_string()),
                    }
                };
                let label = last_part(&qualified);
                let fixed = match rule {
                    Rule::Column(i) if plan.columns[i].1 == Style::Redact => {
                        encode_replacement(f.type_oid, f.format == 1, || {
                            plan.masker.mask_whole("", &label, Style::Redact)
                        })
                    }
                    _ => None,
                };
                Col {
                    rule,
                    label,
                    fixed,
                    qualified,
                    type_oid: f.type_oid,
                    binary: f.format == 1,
                }
            })
            .collect();
        Shape { cols }
    }
}

/// A relation's name as an SQL string literal for `to_regclass`: each part
/// double-quoted (so its case and characters are kept), the whole quoted.
fn relation_literal(schema: &str, name: &str) -> String {
    let ident = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let qualified = if schema.is_empty() {
        ident(name)
    } else {
        format!("{}.{}", ident(schema), ident(name))
    };
    format!("'{}'", qualified.replace('\'', "''"))
}

fn last_part(name: &str) -> String {
    name.rsplit('.').next().unwrap_or(name).to_string()
}

struct Field {
    table: u32,
    attnum: i16,
    type_oid: u32,
    format: i16,
}

fn fields(body: &[u8]) -> Vec<Field> {
    let mut out = Vec::new();
    let Some(n) = body.get(..2).map(|b| i16::from_be_bytes([b[0], b[1]])) else {
        return out;
    };
    let mut pos = 2;
    for _ in 0..n.max(0) {
        let Some(z) = body.get(pos..).and_then(|r| r.iter().position(|&c| c == 0)) else {
            break;
        };
        pos += z + 1;
        let Some(f) = body.get(pos..pos + 18) else {
            break;
        };
        out.push(Field {
            table: u32::from_be_bytes([f[0], f[1], f[2], f[3]]),
            attnum: i16::from_be_bytes([f[4], f[5]]),
            type_oid: u32::from_be_bytes([f[6], f[7], f[8], f[9]]),
            format: i16::from_be_bytes([f[16], f[17]]),
        });
        pos += 18;
    }
    out
}

/// Complete messages in `buf`: `(tag, body)`.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let head = buf.get(at..at + 5)?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len < 4 {
            return None;
        }
        let body = buf.get(at + 5..at + 1 + len)?;
        at += 1 + len;
        Some((head[0], body))
    })
}

fn text_like(oid: u32) -> bool {
    matches!(oid, TEXT | VARCHAR | BPCHAR | NAME | UNKNOWN)
}

/// A JSON string literal of `s` (the replacements hold no quote or backslash,
/// but escape anyway).
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A masked column's replacement as a value of its type and format: the
/// text for text-like types, a JSON string for `json`/`jsonb` (binary `jsonb`
/// with its version byte), and `None` (NULL) for any other type.
fn encode_replacement(
    type_oid: u32,
    binary: bool,
    replacement: impl FnOnce() -> String,
) -> Option<Vec<u8>> {
    match type_oid {
        t if text_like(t) => Some(replacement().into_bytes()),
        JSONB if binary => {
            let mut v = vec![1u8];
            v.extend_from_slice(json_string(&replacement()).as_bytes());
            Some(v)
        }
        JSON | JSONB => Some(json_string(&replacement()).into_bytes()),
        _ => None,
    }
}

/// The new value of one column, or `None` to keep it as is; `Some(None)` is NULL.
fn mask_value(plan: &Plan, col: &Col, v: &[u8], counts: &mut Tally) -> NewValue {
    if col.rule != Rule::None {
        bump(counts, &col.qualified, 1);
    }
    match col.rule {
        Rule::Unresolved => return Some(None),
        Rule::Column(_) if col.fixed.is_some() => return Some(col.fixed.clone()),
        Rule::Column(i) => {
            let style = plan.columns[i].1;
            // Binary jsonb starts with its version byte; the rest is the text.
            let text = match (col.type_oid, col.binary) {
                (JSONB, true) => String::from_utf8_lossy(v.get(1..).unwrap_or_default()),
                _ => String::from_utf8_lossy(v),
            };
            return Some(encode_replacement(col.type_oid, col.binary, || {
                plan.masker.mask_whole(&text, &col.label, style)
            }));
        }
        Rule::None => {}
    }
    if !plan.detectors {
        return None;
    }
    let textual = text_like(col.type_oid) || matches!(col.type_oid, JSON | JSONB);
    let (prefix, scan) = match (col.binary, col.type_oid) {
        (true, JSONB) => (
            v.get(..1).unwrap_or_default(),
            v.get(1..).unwrap_or_default(),
        ),
        (true, t) if text_like(t) || t == JSON => (&[][..], v),
        (true, t) if TEXT_ARRAYS.contains(&t) => {
            return binary_text_array(plan, v, counts);
        }
        // Numbers, dates, UUIDs…: no text to find.
        (true, t) if BINARY_SAFE.contains(&t) => return None,
        // Anything else in binary (records, composites, ranges, other
        // arrays…) may carry text the gate cannot read: withheld.
        (true, _) => return Some(None),
        (false, _) => (&[][..], v),
    };
    let text = std::str::from_utf8(scan).ok()?;
    let (masked, c) = plan.masker.mask(text);
    if c.total() == 0 {
        return None;
    }
    tally(counts, &c);
    if textual || (!col.binary && TEXT_ARRAYS.contains(&col.type_oid)) {
        let mut out = prefix.to_vec();
        out.extend_from_slice(masked.as_bytes());
        Some(Some(out))
    } else {
        Some(None)
    }
}

/// Binary types with no text inside: passed as they are.
const BINARY_SAFE: [u32; 27] = [
    16, 20, 21, 23, 26, 700, 701, 1700, 1082, 1083, 1114, 1184, 1186, 1266, 2950,
    790, // scalars
    1000, 1005, 1007, 1016, 1021, 1022, 1231, 1182, 1115, 1185, 2951, // their arrays
];

/// A binary array of a text-like type with detectors applied to each
/// element, as [`mask_value`] answers: `None` when nothing changed, NULL
/// for a malformed array.
fn binary_text_array(plan: &Plan, v: &[u8], counts: &mut Tally) -> NewValue {
    let be32 = |at: usize| -> Option<i32> {
        v.get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let malformed = Some(None);
    let Some(ndim) = be32(0).filter(|n| (0..=6).contains(n)) else {
        return malformed;
    };
    let mut pos = 12 + 8 * ndim as usize;
    if v.len() < pos {
        return malformed;
    }
    let mut out = v[..pos].to_vec();
    let mut changed = false;
    while pos < v.len() {
        let Some(len) = be32(pos) else {
            return malformed;
        };
        pos += 4;
        if len < 0 {
            out.extend_from_slice(&len.to_be_bytes());
            continue;
        }
        let Some(e) = v.get(pos..pos + len as usize) else {
            return malformed;
        };
        pos += len as usize;
        let text = String::from_utf8_lossy(e);
        let (m, c) = plan.masker.mask(&text);
        if c.total() > 0 {
            tally(counts, &c);
            changed = true;
        }
        out.extend_from_slice(&(m.len() as i32).to_be_bytes());
        out.extend_from_slice(m.as_bytes());
    }
    changed.then_some(Some(out))
}

/// A length-prefixed value as DataRow and binary COPY carry it (`None`: NULL).
fn put_value(out: &mut impl BufMut, v: Option<&[u8]>) {
    match v {
        Some(v) => {
            out.put_i32(v.len() as i32);
            out.put_slice(v);
        }
        None => out.put_i32(-1),
    }
}

/// A DataRow rewritten under `shape`, or `None` when nothing changes.
pub fn data_row(plan: &Plan, shape: &Shape, body: &[u8], counts: &mut Tally) -> Option<Bytes> {
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut pos = 2;
    // Written only from the first changed value on (what came before is
    // copied as it is).
    let mut out: Option<BytesMut> = None;
    for i in 0..n.max(0) as usize {
        let field = pos;
        let len = i32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?);
        pos += 4;
        let value = if len < 0 {
            None
        } else {
            let v = body.get(pos..pos + len as usize)?;
            pos += len as usize;
            Some(v)
        };
        let new = value.and_then(|v| {
            shape
                .cols
                .get(i)
                .and_then(|col| mask_value(plan, col, v, counts))
        });
        match (new, out.as_mut()) {
            (None, None) => {}
            (None, Some(o)) => o.extend_from_slice(&body[field..pos]),
            (Some(new), o) => {
                let o = match o {
                    Some(o) => o,
                    None => {
                        let mut b = BytesMut::with_capacity(body.len() + 64);
                        b.put_u8(b'D');
                        b.put_i32(0);
                        b.extend_from_slice(&body[..field]);
                        out.insert(b)
                    }
                };
                put_value(o, new.as_deref());
            }
        }
    }
    let mut out = out?;
    let total = (out.len() - 1) as i32;
    out[1..5].copy_from_slice(&total.to_be_bytes());
    Some(out.freeze())
}

/// An ErrorResponse or NoticeResponse with detectors applied to its text
/// fields, and the values in a `Key (…)=(…)` or `Failing row contains (…)`
/// detail withheld when columns are masked (they may be masked columns).
pub fn notice(plan: &Plan, tag: u8, body: &[u8], counts: &mut Tally) -> Option<Bytes> {
    let fields = codec::error_fields(body);
    let mut changed = false;
    let mut out = BytesMut::with_capacity(body.len() + 16);
    out.put_u8(tag);
    out.put_i32(0);
    for (k, v) in fields {
        let mut value = v.clone();
        if matches!(k, b'M' | b'D' | b'W' | b'H' | b'q') {
            if plan.detectors {
                let (m, c) = plan.masker.mask(&value);
                if c.total() > 0 {
                    tally(counts, &c);
                    value = m.into_owned();
                }
            }
            if k == b'D' && !plan.columns.is_empty() {
                value = withhold_detail(&value);
            }
        }
        changed |= value != v;
        out.put_u8(k);
        out.extend_from_slice(value.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    if !changed {
        return None;
    }
    let total = (out.len() - 1) as i32;
    out[1..5].copy_from_slice(&total.to_be_bytes());
    Some(out.freeze())
}

/// `Key (email)=(ann@example.com) already exists.` → `Key (email)=(…) already exists.`
fn withhold_detail(d: &str) -> String {
    if let Some(i) = d.find(")=(") {
        let start = i + 3;
        // The values end at the last `)` before the rest of the sentence.
        if let Some(end) = d[start..].rfind(')') {
            return format!("{}…{}", &d[..start], &d[start + end..]);
        }
    }
    if let Some(rest) = d.strip_prefix("Failing row contains (") {
        let tail = rest.rfind(')').map(|e| &rest[e..]).unwrap_or(")");
        return format!("Failing row contains (…{tail}");
    }
    d.to_string()
}

/// A NotificationResponse with detectors applied to its payload.
pub fn notification(plan: &Plan, body: &[u8], counts: &mut Tally) -> Option<Bytes> {
    if !plan.detectors {
        return None;
    }
    let mut pos = 4;
    let channel = codec::cstr(body, &mut pos)?;
    let payload = codec::cstr(body, &mut pos)?;
    let (m, c) = plan.masker.mask(&payload);
    if c.total() == 0 {
        return None;
    }
    tally(counts, &c);
    let mut out = BytesMut::new();
    out.put_u8(b'A');
    out.put_i32((4 + 4 + channel.len() + 1 + m.len() + 1) as i32);
    out.extend_from_slice(&body[..4]);
    out.extend_from_slice(channel.as_bytes());
    out.put_u8(0);
    out.extend_from_slice(m.as_bytes());
    out.put_u8(0);
    Some(out.freeze())
}

/// CopyData from the server with detectors applied (text and CSV rows;
/// binary COPY is passed as is).
pub fn copy_data(plan: &Plan, body: &[u8], counts: &mut Tally) -> Option<Bytes> {
    if !plan.detectors {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    let (m, c) = plan.masker.mask(text);
    if c.total() == 0 {
        return None;
    }
    tally(counts, &c);
    let mut out = BytesMut::with_capacity(m.len() + 5);
    out.put_u8(b'd');
    out.put_i32((m.len() + 4) as i32);
    out.extend_from_slice(m.as_bytes());
    Some(out.freeze())
}

/// Runs one catalog query on a fresh side connection to `database`.
async fn catalog_query(
    upstream: &UpstreamConfig,
    database: &str,
    sql: &str,
) -> Result<Vec<[String; 5]>, String> {
    use tokio::io::AsyncWriteExt;
    let params = [(
        "application_name".to_string(),
        "wicket-pg catalog".to_string(),
    )];
    let (mut s, _) = upstream::connect(upstream, database, &params)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(&codec::build::query(sql))
        .await
        .map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let m = codec::read_message(&mut s, 64 << 20)
            .await
            .map_err(|e| e.to_string())?;
        match m.tag {
            b'D' => {
                let mut vals = Vec::with_capacity(5);
                let mut pos = 2;
                for _ in 0..5 {
                    let len = m
                        .body
                        .get(pos..pos + 4)
                        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or("short row")?;
                    pos += 4;
                    if len < 0 {
                        vals.push(String::new());
                        continue;
                    }
                    let v = m.body.get(pos..pos + len as usize).ok_or("short row")?;
                    vals.push(String::from_utf8_lossy(v).into_owned());
                    pos += len as usize;
                }
                let arr: [String; 5] = vals.try_into().map_err(|_| "short row")?;
                rows.push(arr);
            }
            b'E' => {
                error = Some(
                    codec::error_fields(&m.body)
                        .into_iter()
                        .find(|(k, _)| *k == b'M')
                        .map(|(_, v)| v)
                        .unwrap_or_default(),
                );
            }
            b'Z' => break,
            _ => {}
        }
    }
    let _ = s.write_all(&codec::build::terminate()).await;
    match error {
        Some(e) => Err(format!("catalog query failed: {e}")),
        None => Ok(rows),
    }
}

#[cfg(test)]
mod tests {
    use super::{Col, Plan, Rule, Shape, Tally, data_row, withhold_detail};

    fn plan() -> Plan {
        let policy = wicket_policy::parse_and_compile(
            "version: 1\nconnections:\n  - name: db\n    protocol: postgres\n    masking:\n      columns: [{column: public.t.secret}]\n      detectors: [email]\n",
            "t",
        )
        .unwrap();
        Plan::compile(&policy, "db", b"k").unwrap().unwrap()
    }

    fn col(rule: Rule, type_oid: u32, binary: bool) -> Col {
        Col {
            fixed: None,
            rule,
            label: "secret".into(),
            qualified: if rule == Rule::Unresolved {
                "unresolved".into()
            } else {
                "public.t.secret".into()
            },
            type_oid,
            binary,
        }
    }

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b
    }

    fn values(msg: &[u8]) -> Vec<Option<Vec<u8>>> {
        let body = &msg[5..];
        let n = i16::from_be_bytes([body[0], body[1]]);
        let mut pos = 2;
        (0..n)
            .map(|_| {
                let len = i32::from_be_bytes(body[pos..pos + 4].try_into().unwrap());
                pos += 4;
                if len < 0 {
                    return None;
                }
                let v = body[pos..pos + len as usize].to_vec();
                pos += len as usize;
                Some(v)
            })
            .collect()
    }

    #[test]
    fn rows_are_rewritten_per_type_and_format() {
        let p = plan();
        let shape = Shape {
            cols: vec![
                col(Rule::Column(0), 25, false),  // masked text
                col(Rule::Column(0), 23, true),   // masked int4, binary: NULL
                col(Rule::None, 25, true),        // text, binary: detectors
                col(Rule::None, 23, true),        // int4 binary: untouched
                col(Rule::None, 2249, true),      // a record in binary: withheld
                col(Rule::Unresolved, 25, false), // unknown table: withheld
                col(Rule::None, 1009, true),      // text[] binary: per element
                col(Rule::None, 20, false),       // int8 text: untouched
            ],
        };
        // text[] with one element, binary: ndim 1, no nulls, elem type 25, dim 1, lbound 1.
        let mut arr = Vec::new();
        for x in [1i32, 0, 25, 1, 1] {
            arr.extend_from_slice(&x.to_be_bytes());
        }
        arr.extend_from_slice(&15i32.to_be_bytes());
        arr.extend_from_slice(b"ann@example.com");
        let body = row(&[
            Some(b"hidden"),
            Some(&7i32.to_be_bytes()),
            Some(b"mail ann@example.com"),
            Some(&7i32.to_be_bytes()),
            Some(b"\x00\x00"),
            Some(b"x"),
            Some(&arr),
            None,
        ]);
        let mut tally = Tally::new();
        let out = data_row(&p, &shape, &body, &mut tally).expect("changed");
        let v = values(&out);
        assert_eq!(v[0].as_deref(), Some(&b"[redacted:secret]"[..]));
        assert_eq!(v[1], None);
        assert_eq!(v[2].as_deref(), Some(&b"mail [redacted:email]"[..]));
        assert_eq!(v[3].as_deref(), Some(&7i32.to_be_bytes()[..]));
        assert_eq!(v[4], None);
        assert_eq!(v[5], None);
        let a = v[6].clone().unwrap();
        assert!(a.ends_with(b"[redacted:email]") && !a.windows(7).any(|w| w == b"example"));
        assert_eq!(v[7], None);
        assert_eq!(tally.get("email"), Some(&2));
        assert_eq!(tally.get("public.t.secret"), Some(&2));
        assert_eq!(tally.get("unresolved"), Some(&1));
        // Nothing to mask: no copy.
        let clean = row(&[Some(b"x"), None]);
        let plain = Shape {
            cols: vec![col(Rule::None, 25, false), col(Rule::None, 25, false)],
        };
        assert!(data_row(&p, &plain, &clean, &mut tally).is_none());
    }

    #[test]
    fn details_withhold_values() {
        assert_eq!(
            withhold_detail("Key (email)=(ann@example.com) already exists."),
            "Key (email)=(…) already exists."
        );
        assert_eq!(
            withhold_detail("Failing row contains (1, Ann, 123-45-6789)."),
            "Failing row contains (…)."
        );
        assert_eq!(withhold_detail("nothing here"), "nothing here");
    }

    #[test]
    fn policy_detector_names_are_the_engine_names() {
        for name in wicket_policy::BUILTIN_DETECTORS {
            assert!(name.parse::<wicket_mask::Entity>().is_ok(), "{name}");
        }
        assert_eq!(
            wicket_policy::BUILTIN_DETECTORS.len(),
            wicket_mask::Entity::ALL.len()
        );
    }
}

/// How COPY rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    /// Tab-separated text with backslash escapes.
    Text,
    /// Comma-separated values with quotes.
    Csv,
    /// PostgreSQL's binary COPY format.
    Binary,
}

/// A `COPY table [(columns)] TO STDOUT`, as far as masking needs it.
#[derive(Debug, Clone)]
pub struct CopyOut {
    schema: String,
    table: String,
    columns: Vec<String>,
    format: CopyFormat,
    delimiter: u8,
    quote: u8,
    null: String,
    header: bool,
}

/// The COPY of a table to the client in `sql`, if that is what it is.
pub fn copy_out(sql: &str) -> Option<CopyOut> {
    use pg_query::NodeEnum;
    let parsed = pg_query::parse(sql, 0).ok()?;
    let raw = parsed.protobuf.stmts.first()?;
    let NodeEnum::CopyStmt(c) = raw.stmt.as_ref()?.node.as_ref()? else {
        return None;
    };
    if c.is_from || !c.filename.is_empty() || c.is_program {
        return None;
    }
    let rel = c.relation.as_ref()?;
    let name = |n: &pg_query::protobuf::Node| match n.node.as_ref() {
        Some(NodeEnum::String(s)) => Some(s.sval.clone()),
        _ => None,
    };
    let mut out = CopyOut {
        schema: rel.schemaname.clone(),
        table: rel.relname.clone(),
        columns: c.attlist.iter().filter_map(name).collect(),
        format: CopyFormat::Text,
        delimiter: b'\t',
        quote: b'"',
        null: "\\N".into(),
        header: false,
    };
    let mut delimiter = None;
    let mut null = None;
    for o in &c.options {
        let Some(NodeEnum::DefElem(d)) = o.node.as_ref() else {
            continue;
        };
        let arg = d.arg.as_deref().and_then(name).unwrap_or_default();
        match d.defname.as_str() {
            "format" => {
                out.format = match arg.to_ascii_lowercase().as_str() {
                    "csv" => CopyFormat::Csv,
                    "binary" => CopyFormat::Binary,
                    _ => CopyFormat::Text,
                }
            }
            "delimiter" => delimiter = arg.bytes().next(),
            "quote" => out.quote = arg.bytes().next().unwrap_or(b'"'),
            "null" => null = Some(arg),
            "header" => {
                out.header = match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
                    None => true,
                    Some(NodeEnum::Boolean(b)) => b.boolval,
                    Some(NodeEnum::Integer(i)) => i.ival != 0,
                    Some(NodeEnum::String(s)) => {
                        !matches!(s.sval.to_ascii_lowercase().as_str(), "false" | "off" | "0")
                    }
                    _ => true,
                }
            }
            _ => {}
        }
    }
    if out.format == CopyFormat::Csv {
        out.delimiter = b',';
        out.null = String::new();
    }
    out.delimiter = delimiter.unwrap_or(out.delimiter);
    out.null = null.unwrap_or(out.null);
    Some(out)
}

/// How a COPY's rows are masked, column by column.
#[derive(Debug)]
pub struct CopyPlan {
    cols: Vec<Col>,
    out: CopyOut,
    /// The layout could not be resolved: every field is withheld.
    withhold_all: bool,
    /// A header line is still to come (CSV `HEADER`): column names, passed as they are.
    header_pending: std::sync::atomic::AtomicBool,
}

impl Masking {
    /// The masking of `copy`'s rows, from `database`'s catalog.
    pub async fn copy_plan(
        &self,
        plan: &Plan,
        upstream: &UpstreamConfig,
        database: &str,
        copy: CopyOut,
    ) -> CopyPlan {
        let literal = relation_literal(&copy.schema, &copy.table);
        let sql = format!(
            "SELECT a.attnum, a.atttypid, n.nspname, c.relname, a.attname \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE a.attrelid = pg_catalog.to_regclass({literal}) AND a.attnum > 0 \
             AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum"
        );
        let rows = match catalog_query(upstream, database, &sql).await {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::error!(error = %e, database, "cannot resolve a COPY's columns; its rows are withheld");
                Vec::new()
            }
        };
        let col = |r: &[String; 5]| {
            let rule = plan.column_rule(&r[2], &r[3], &r[4]);
            let qualified = format!("{}.{}.{}", r[2], r[3], r[4]);
            Col {
                fixed: None,
                rule: rule.map_or(Rule::None, Rule::Column),
                label: r[4].clone(),
                qualified,
                type_oid: r[1].parse().unwrap_or(0),
                binary: copy.format == CopyFormat::Binary,
            }
        };
        let cols: Vec<Col> = if copy.columns.is_empty() {
            rows.iter().map(col).collect()
        } else {
            copy.columns
                .iter()
                .map(|name| match rows.iter().find(|r| &r[4] == name) {
                    Some(r) => col(r),
                    None => Col {
                        fixed: None,
                        rule: Rule::Unresolved,
                        label: name.clone(),
                        qualified: "unresolved".into(),
                        type_oid: 0,
                        binary: copy.format == CopyFormat::Binary,
                    },
                })
                .collect()
        };
        CopyPlan {
            header_pending: std::sync::atomic::AtomicBool::new(
                copy.header && copy.format == CopyFormat::Csv,
            ),
            withhold_all: rows.is_empty(),
            cols,
            out: copy,
        }
    }
}

/// One COPY row (a CopyData body) masked under `cp`; `None` when unchanged.
pub fn copy_row(plan: &Plan, cp: &CopyPlan, body: &[u8], counts: &mut Tally) -> Option<Bytes> {
    let row = match cp.out.format {
        CopyFormat::Binary => copy_binary_row(plan, cp, body, counts)?,
        CopyFormat::Text | CopyFormat::Csv => copy_text_row(plan, cp, body, counts)?,
    };
    let mut out = BytesMut::with_capacity(row.len() + 5);
    out.put_u8(b'd');
    out.put_i32((row.len() + 4) as i32);
    out.extend_from_slice(&row);
    Some(out.freeze())
}

fn copy_binary_row(plan: &Plan, cp: &CopyPlan, body: &[u8], counts: &mut Tally) -> Option<Vec<u8>> {
    const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
    // The header comes with the first row: signature, flags, extension.
    let mut pos = 0;
    if body.starts_with(SIGNATURE) {
        let ext = body.get(15..19)?;
        pos = 19 + i32::from_be_bytes(ext.try_into().ok()?).max(0) as usize;
    }
    let mut out = body.get(..pos)?.to_vec();
    let mut changed = false;
    while pos < body.len() {
        let n = i16::from_be_bytes([*body.get(pos)?, *body.get(pos + 1)?]);
        out.extend_from_slice(&body[pos..pos + 2]);
        pos += 2;
        if n < 0 {
            continue; // the trailer
        }
        for i in 0..n as usize {
            let len = i32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?);
            pos += 4;
            if len < 0 {
                out.extend_from_slice(&len.to_be_bytes());
                continue;
            }
            let v = body.get(pos..pos + len as usize)?;
            pos += len as usize;
            let new = if cp.withhold_all {
                Some(None)
            } else {
                cp.cols.get(i).and_then(|c| mask_value(plan, c, v, counts))
            };
            match new {
                None => put_value(&mut out, Some(v)),
                Some(m) => {
                    changed = true;
                    put_value(&mut out, m.as_deref());
                }
            }
        }
    }
    changed.then_some(out)
}

/// Splits a text or CSV COPY line into raw fields (quotes kept).
fn split_fields(line: &[u8], delimiter: u8, quote: Option<u8>) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, &c) in line.iter().enumerate() {
        if Some(c) == quote {
            quoted = !quoted;
        } else if c == delimiter && !quoted {
            fields.push(&line[start..i]);
            start = i + 1;
        }
    }
    fields.push(&line[start..]);
    fields
}

/// A text-format field's value: `None` for NULL.
fn text_field(raw: &[u8], cp: &CopyPlan) -> Option<Vec<u8>> {
    if raw == cp.out.null.as_bytes() {
        return None;
    }
    match cp.out.format {
        CopyFormat::Csv => {
            let q = cp.out.quote;
            if raw.len() >= 2 && raw[0] == q && raw[raw.len() - 1] == q {
                let inner = &raw[1..raw.len() - 1];
                let mut v = Vec::with_capacity(inner.len());
                let mut i = 0;
                while i < inner.len() {
                    v.push(inner[i]);
                    i += if inner[i] == q && inner.get(i + 1) == Some(&q) {
                        2
                    } else {
                        1
                    };
                }
                Some(v)
            } else {
                Some(raw.to_vec())
            }
        }
        _ => {
            let mut v = Vec::with_capacity(raw.len());
            let mut i = 0;
            while i < raw.len() {
                if raw[i] == b'\\' && i + 1 < raw.len() {
                    v.push(match raw[i + 1] {
                        b't' => b'\t',
                        b'n' => b'\n',
                        b'r' => b'\r',
                        c => c,
                    });
                    i += 2;
                } else {
                    v.push(raw[i]);
                    i += 1;
                }
            }
            Some(v)
        }
    }
}

/// A value written back as a text or CSV field (`None`: NULL).
fn write_field(out: &mut Vec<u8>, v: Option<&[u8]>, cp: &CopyPlan) {
    let Some(v) = v else {
        out.extend_from_slice(cp.out.null.as_bytes());
        return;
    };
    match cp.out.format {
        CopyFormat::Csv => {
            let q = cp.out.quote;
            out.push(q);
            for &c in v {
                if c == q {
                    out.push(q);
                }
                out.push(c);
            }
            out.push(q);
        }
        _ => {
            for &c in v {
                match c {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    c if c == cp.out.delimiter => {
                        out.push(b'\\');
                        out.push(c);
                    }
                    c => out.push(c),
                }
            }
        }
    }
}

fn copy_text_row(plan: &Plan, cp: &CopyPlan, body: &[u8], counts: &mut Tally) -> Option<Vec<u8>> {
    if cp.header_pending.swap(false, Ordering::Relaxed) {
        return None;
    }
    let line = body.strip_suffix(b"\n").unwrap_or(body);
    let quote = (cp.out.format == CopyFormat::Csv).then_some(cp.out.quote);
    let fields = split_fields(line, cp.out.delimiter, quote);
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut changed = false;
    for (i, raw) in fields.iter().enumerate() {
        if i > 0 {
            out.push(cp.out.delimiter);
        }
        let value = text_field(raw, cp);
        let new = match (&value, cp.withhold_all) {
            (_, true) => Some(None),
            (None, false) => None,
            (Some(v), false) => cp.cols.get(i).and_then(|c| {
                // Text fields are text whatever the type; the type decides
                // what a masked one becomes.
                let text_col = Col {
                    binary: false,
                    ..c.clone()
                };
                mask_value(plan, &text_col, v, counts)
            }),
        };
        match new {
            None => out.extend_from_slice(raw),
            Some(v) => {
                changed = true;
                write_field(&mut out, v.as_deref(), cp);
            }
        }
    }
    if body.ends_with(b"\n") {
        out.push(b'\n');
    }
    changed.then_some(out)
}
