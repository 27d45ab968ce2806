//! A small PostgreSQL client for `postgres_query`: one connection per call
//! to the `wicket-pg` gate, the token as password, the reasoning in the
//! startup options (as `PGOPTIONS='-c wicket.reasoning=…'` gives it), the
//! simple query protocol. Notices (an approval wait) are passed on as they
//! arrive.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where a gate is.
#[derive(Debug, Clone)]
pub struct Target {
    host: String,
    port: u16,
    database: String,
    user: String,
    /// `None`: plain (loopback gates); `Some`: TLS verified against the
    /// `sslrootcert` CA.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// Parses `postgresql://[USER@]HOST[:PORT]/DB[?sslmode=disable|verify-full[&sslrootcert=FILE]]`.
    pub fn parse(url: &str) -> Result<Target, String> {
        let u = url::Url::parse(url).map_err(|e| format!("bad gate URL {url}: {e}"))?;
        let host = u
            .host_str()
            .ok_or_else(|| format!("{url} has no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let database = u.path().trim_start_matches('/').to_string();
        if database.is_empty() {
            return Err(format!("{url} names no database"));
        }
        let q: std::collections::HashMap<_, _> = u.query_pairs().into_owned().collect();
        let tls = match q.get("sslmode").map(String::as_str) {
            None | Some("disable") => None,
            Some("verify-full") => {
                let ca = q
                    .get("sslrootcert")
                    .ok_or("sslmode=verify-full needs sslrootcert=FILE")?;
                Some(super::tls_trusting(
                    std::path::Path::new(ca),
                    &[b"postgresql"],
                )?)
            }
            Some(other) => {
                return Err(format!(
                    "{url}: sslmode={other} is not supported (use verify-full, or disable for a gate on loopback)"
                ));
            }
        };
        Ok(Target {
            host,
            port: u.port().unwrap_or(5432),
            database,
            user: if u.username().is_empty() {
                "wicket-mcp".into()
            } else {
                u.username().into()
            },
            tls,
        })
    }
}

/// One call.
#[derive(Debug)]
pub struct Call<'a> {
    pub sql: &'a str,
    pub token: &'a str,
    pub reasoning: &'a str,
    pub app: &'a str,
    pub traceparent: Option<&'a str>,
    pub max_rows: usize,
}

/// What a call returned.
#[derive(Debug, Default)]
pub struct Outcome {
    columns: Vec<String>,
    rows: Vec<Vec<Value>>,
    more_rows: usize,
    tags: Vec<String>,
    notices: Vec<String>,
    /// The first error: (SQLSTATE, message).
    pub error: Option<(String, String)>,
}

impl Outcome {
    /// The structured result.
    pub fn json(&self) -> Value {
        let mut v = json!({
            "columns": self.columns,
            "rows": self.rows,
            "commands": self.tags,
        });
        if self.more_rows > 0 {
            v["rows_not_shown"] = json!(self.more_rows);
        }
        if !self.notices.is_empty() {
            v["notices"] = json!(self.notices);
        }
        if let Some((code, message)) = &self.error {
            v["error"] = json!({"sqlstate": code, "message": message});
        }
        v
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn frame(kind: Option<u8>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.extend(kind);
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// `-c wicket.reasoning=…` with PostgreSQL's escaping of options.
fn option_value(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\\' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' | '\0' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

async fn read_msg(s: &mut (impl AsyncRead + Unpin)) -> Result<(u8, Vec<u8>), String> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)
        .await
        .map_err(|e| format!("the gate closed the connection: {e}"))?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if !(4..=64 * 1024 * 1024).contains(&len) {
        return Err(format!("bad message length {len} from the gate"));
    }
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body)
        .await
        .map_err(|e| format!("the gate closed the connection: {e}"))?;
    Ok((head[0], body))
}

/// Reads a backend message's body without trusting it.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a malformed message from the gate".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cstr(&mut self) -> Result<String, String> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or("a malformed message from the gate")?;
        let s = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
}

/// Error and notice fields: (SQLSTATE, message).
fn fields(body: &[u8]) -> (String, String) {
    let (mut code, mut msg) = (String::new(), String::new());
    let mut rest = body;
    while let Some((&t, tail)) = rest.split_first() {
        if t == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let v = String::from_utf8_lossy(&tail[..end]).into_owned();
        match t {
            b'C' => code = v,
            b'M' => msg = v,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    (code, msg)
}

async fn connect(t: &Target) -> Result<Box<dyn Io>, String> {
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        tokio::net::TcpStream::connect((t.host.as_str(), t.port)),
    )
    .await
    .map_err(|_| format!("connecting to the gate at {}:{} timed out", t.host, t.port))?
    .map_err(|e| format!("cannot reach the gate at {}:{}: {e}", t.host, t.port))?;
    let _ = tcp.set_nodelay(true);
    let Some(cfg) = &t.tls else {
        return Ok(Box::new(tcp));
    };
    let mut tcp = tcp;
    // SSLRequest.
    tcp.write_all(&frame(None, &80877103i32.to_be_bytes()))
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    if answer[0] != b'S' {
        return Err("the gate does not offer TLS (sslmode=verify-full)".into());
    }
    let name = rustls::pki_types::ServerName::try_from(t.host.clone())
        .map_err(|e| format!("bad host {}: {e}", t.host))?;
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS to the gate failed: {e}"))?;
    Ok(Box::new(tls))
}

/// Runs `call` on the gate at `t`; `notice` hears each notice as it comes.
pub async fn run(t: &Target, call: Call<'_>, notice: impl Fn(String)) -> Result<Outcome, String> {
    let mut s = connect(t).await?;
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [
        ("user", t.user.as_str()),
        ("database", t.database.as_str()),
        ("application_name", call.app),
    ] {
        cstr(&mut body, k);
        cstr(&mut body, v);
    }
    cstr(&mut body, "options");
    cstr(
        &mut body,
        &format!("-c wicket.reasoning={}", option_value(call.reasoning)),
    );
    body.push(0);
    s.write_all(&frame(None, &body))
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Outcome::default();
    loop {
        let (kind, body) = read_msg(&mut s).await?;
        match kind {
            b'R' => match Body(&body).i32()? {
                0 => {}
                3 => {
                    let mut pw = Vec::new();
                    cstr(&mut pw, call.token);
                    s.write_all(&frame(Some(b'p'), &pw))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                other => {
                    return Err(format!(
                        "the gate asked for authentication method {other}; wicket mcp sends the token as a password"
                    ));
                }
            },
            b'E' => {
                let (code, msg) = fields(&body);
                return Err(format!("the gate refused the connection: {msg} ({code})"));
            }
            b'N' => notice(fields(&body).1),
            b'Z' => break,
            _ => {}
        }
    }
    let sql = match call.traceparent {
        // sqlcommenter: the gate joins the statement to the stored trace.
        Some(tp) => format!(
            "{} /*traceparent='{tp}'*/",
            call.sql.trim_end().trim_end_matches(';')
        ),
        None => call.sql.to_string(),
    };
    let mut q = Vec::new();
    cstr(&mut q, &sql);
    s.write_all(&frame(Some(b'Q'), &q))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let (kind, body) = read_msg(&mut s).await?;
        match kind {
            b'T' => {
                out.columns.clear();
                out.rows.clear();
                out.more_rows = 0;
                let mut b = Body(&body);
                for _ in 0..b.u16()? {
                    out.columns.push(b.cstr()?);
                    // Table, column, type, size, modifier, format.
                    b.take(18)?;
                }
            }
            b'D' => {
                if out.rows.len() >= call.max_rows {
                    out.more_rows += 1;
                    continue;
                }
                let mut b = Body(&body);
                let n = b.u16()?;
                let mut row = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    let len = b.i32()?;
                    row.push(match usize::try_from(len) {
                        Ok(len) => {
                            Value::String(String::from_utf8_lossy(b.take(len)?).into_owned())
                        }
                        Err(_) => Value::Null,
                    });
                }
                out.rows.push(row);
            }
            b'C' => out.tags.push(Body(&body).cstr()?),
            b'N' => {
                let msg = fields(&body).1;
                notice(msg.clone());
                out.notices.push(msg);
            }
            b'E' if out.error.is_none() => out.error = Some(fields(&body)),
            b'Z' => break,
            _ => {}
        }
    }
    let _ = s.write_all(&frame(Some(b'X'), &[])).await;
    Ok(out)
}
