//! The SSH server the clients see, the SSH client the gate is to the host,
//! and the relay between their channels.
//!
//! One client connection is one Wicket session and one upstream connection
//! (opened at the first channel). Each client channel is relayed by its own
//! task to its own upstream channel. Channel requests are answered to the
//! client at once, in order (SSH needs the replies in request order); what
//! a request does is decided in the channel's task, so a command held for
//! approval holds only its own channel.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelOpenFailure, Disconnect, MethodKind, MethodSet,
};
use tokio::sync::{OnceCell, Semaphore};
use wicket_core::{AuditKind, Classification, Command, Decision, Effect};
use wicket_mask::Masker;
use wicket_sidecar::Sidecar;

use crate::classify;
use crate::line::{LineEditor, Piece};
use crate::sftp;
use wicket_sidecar::recording::{self as record, Recorder};

/// How the gate logs in upstream.
#[derive(Clone)]
pub enum UpstreamAuth {
    /// A private key (OpenSSH format).
    Key(Arc<PrivateKey>),
    /// A password.
    Password(String),
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpstreamAuth::Key(_) => "Key(***)",
            UpstreamAuth::Password(_) => "Password(***)",
        })
    }
}

/// The host behind the gate.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `host:port`.
    pub addr: String,
    /// The account the gate logs in as.
    pub user: String,
    /// Its credential (only the gate holds it).
    pub auth: UpstreamAuth,
    /// known_hosts file that pins the host's key (`[host]:port` entries for
    /// ports other than 22). A host key not in it is refused.
    pub known_hosts: PathBuf,
}

/// Settings of an SSH gate.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// The host.
    pub upstream: UpstreamConfig,
    /// The gate's own host keys.
    pub host_keys: Vec<PrivateKey>,
    /// CA keys whose user certificates are accepted (empty: none).
    pub user_cas: Vec<PublicKey>,
    /// Key of keyed-hash masking.
    pub mask_key: Vec<u8>,
    /// Time a client has to authenticate (key exchange included).
    pub login_grace: Duration,
    /// Connections that may be authenticating at once.
    pub max_startups: usize,
    /// Channels one connection may hold open.
    pub max_channels: usize,
}

impl SshConfig {
    /// Settings with the defaults for everything but the host and keys.
    pub fn new(upstream: UpstreamConfig, host_keys: Vec<PrivateKey>) -> SshConfig {
        SshConfig {
            upstream,
            host_keys,
            user_cas: Vec::new(),
            mask_key: Vec::new(),
            login_grace: Duration::from_secs(30),
            max_startups: 64,
            max_channels: 32,
        }
    }
}

/// The gate: shared by every connection.
pub struct SshGate {
    sidecar: Arc<Sidecar>,
    cfg: SshConfig,
    server: Arc<server::Config>,
    client: Arc<russh::client::Config>,
    startups: Arc<Semaphore>,
    masker: wicket_sidecar::masking::MaskerCache,
}

impl std::fmt::Debug for SshGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshGate")
            .field("upstream", &self.cfg.upstream.addr)
            .finish()
    }
}

impl SshGate {
    /// A gate over `sidecar`.
    pub fn new(sidecar: Arc<Sidecar>, cfg: SshConfig) -> Arc<SshGate> {
        // Certificates first (OpenSSH then tries the user's keys and
        // certificates before asking for a password).
        let methods = [
            MethodKind::PublicKey,
            MethodKind::Password,
            MethodKind::KeyboardInteractive,
        ];
        let server = server::Config {
            server_id: russh::SshId::Standard(std::borrow::Cow::Owned(format!(
                "SSH-2.0-Wicket_{}",
                env!("CARGO_PKG_VERSION")
            ))),
            methods: MethodSet::from(&methods[..]),
            auth_rejection_time: Duration::from_millis(500),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: cfg.host_keys.clone(),
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 4,
            nodelay: true,
            max_auth_attempts: 6,
            window_size: 8 << 20,
            channel_buffer_size: 64,
            ..Default::default()
        };
        let client = russh::client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 4,
            nodelay: true,
            window_size: 8 << 20,
            channel_buffer_size: 64,
            ..Default::default()
        };
        Arc::new(SshGate {
            startups: Arc::new(Semaphore::new(cfg.max_startups.max(1))),
            sidecar,
            cfg,
            server: Arc::new(server),
            client: Arc::new(client),
            masker: Default::default(),
        })
    }

    /// The detectors' masker under the current bundle (`None`: none set).
    fn masker(&self) -> Option<Arc<Masker>> {
        self.masker.current(&self.sidecar, &self.cfg.mask_key)
    }

    fn recording(&self) -> (bool, bool) {
        let Some(b) = self.sidecar.bundles.current() else {
            return (true, true);
        };
        match b.policy.connection(&self.sidecar.cfg.connection) {
            Some(c) => (c.recording.enabled, c.recording.capture_output),
            None => (true, true),
        }
    }
}

/// Serves clients from `listener` until `shutdown` resolves.
pub async fn serve(
    gate: Arc<SshGate>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    while let Some((stream, peer)) =
        wicket_sidecar::process::next_connection(&listener, &mut shutdown, &gate.sidecar).await
    {
        let Ok(permit) = gate.startups.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections authenticating; refusing one");
            drop(stream);
            continue;
        };
        let gate = gate.clone();
        tokio::spawn(async move {
            let authed = Arc::new(AtomicBool::new(false));
            let conn = Conn {
                gate: gate.clone(),
                peer,
                authed: authed.clone(),
                permit: Some(permit),
                session: None,
                upstream: Arc::new(OnceCell::new()),
                channels: Arc::new(AtomicUsize::new(0)),
                trace: Arc::default(),
                agent: Arc::default(),
                user: String::new(),
                kbd_tries: 0,
                kbd_token: String::new(),
                kbd_parts: 0,
                alive: tokio::sync::watch::channel(()).0,
            };
            let grace = gate.cfg.login_grace;
            let deadline = tokio::time::Instant::now() + grace;
            let kill = Arc::new(Kill::default());
            // The version exchange, within the grace time.
            let session = tokio::select! {
                r = server::run_stream(gate.server.clone(), Killable::new(stream, kill.clone()), conn) => r,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::info!(%peer, "no SSH version line within {}s; disconnected", grace.as_secs());
                    return;
                }
            };
            let session = match session {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "ssh handshake failed");
                    return;
                }
            };
            // Key exchange and authentication, within the grace time too.
            let handle = session.handle();
            let watchdog = async {
                tokio::time::sleep_until(deadline).await;
                if authed.load(Ordering::Acquire) {
                    std::future::pending::<()>().await;
                }
            };
            tokio::pin!(session);
            tokio::select! {
                r = &mut session => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "ssh connection ended");
                    }
                }
                _ = watchdog => {
                    tracing::info!(%peer, "no authentication within {}s; disconnected", grace.as_secs());
                    let _ = handle
                        .disconnect(Disconnect::ByApplication, "authentication timed out".into(), "en".into())
                        .await;
                    // A peer that stopped reading cannot hold the session past a short wait.
                    if tokio::time::timeout(Duration::from_secs(1), &mut session).await.is_err() {
                        kill.kill();
                    }
                }
            }
        });
    }
}

/// Ends a connection from outside the SSH session's own task.
#[derive(Default)]
struct Kill {
    killed: AtomicBool,
    wakers: std::sync::Mutex<Vec<std::task::Waker>>,
}

impl Kill {
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        for w in self.wakers.lock().expect("wakers").drain(..) {
            w.wake();
        }
    }

    /// Whether killed; otherwise remembers who to wake.
    fn check(&self, cx: &std::task::Context<'_>) -> bool {
        if self.killed.load(Ordering::Acquire) {
            return true;
        }
        let mut w = self.wakers.lock().expect("wakers");
        if w.len() >= 8 {
            w.clear();
        }
        if !w.iter().any(|x| x.will_wake(cx.waker())) {
            w.push(cx.waker().clone());
        }
        self.killed.load(Ordering::Acquire)
    }
}

/// A TCP stream that reads end and writes fail once its [`Kill`] fires.
struct Killable {
    inner: tokio::net::TcpStream,
    kill: Arc<Kill>,
}

impl Killable {
    fn new(inner: tokio::net::TcpStream, kill: Arc<Kill>) -> Killable {
        Killable { inner, kill }
    }
}

fn killed() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "connection ended by the gate",
    )
}

impl tokio::io::AsyncRead for Killable {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.kill.check(cx) {
            return std::task::Poll::Ready(Err(killed()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Killable {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.kill.check(cx) {
            return std::task::Poll::Ready(Err(killed()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The upstream connection's handler: checks the host key against the pin.
struct Upstream {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    /// The client's connection, for channels the host opens (remote
    /// forwards and agent requests, both opened only when policy allowed).
    client: server::Handle,
    /// The session, to audit those channels.
    session: Arc<Live>,
    sidecar: Arc<Sidecar>,
}

impl russh::client::Handler for Upstream {
    type Error = russh::Error;

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<russh::client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        // The host only opens these for a remote forward policy allowed.
        let mut e = self.session.bare_event(AuditKind::Notice);
        e.details.insert(
            "forwarded_connection".into(),
            format!(
                "{originator_address}:{originator_port} -> {connected_address}:{connected_port}"
            ),
        );
        let _ = self.sidecar.record(e);
        let client = self.client.clone();
        let (ca, op) = (
            connected_address.to_string(),
            originator_address.to_string(),
        );
        bridge_to_client(channel, reply, async move {
            client
                .channel_open_forwarded_tcpip(ca, connected_port, op, originator_port)
                .await
        });
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<russh::client::Msg>,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        // The host only opens these after an agent request policy allowed.
        let client = self.client.clone();
        bridge_to_client(
            channel,
            reply,
            async move { client.channel_open_agent().await },
        );
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            tracing::error!("the host presented a certificate; only pinned keys are accepted");
            return Ok(false);
        };
        match russh::keys::check_known_hosts_path(&self.host, self.port, key, &self.known_hosts) {
            Ok(true) => Ok(true),
            Ok(false) => {
                tracing::error!(host = %self.host, port = self.port, file = %self.known_hosts.display(),
                    "the host's key is not pinned in the known_hosts file; refusing to connect");
                Ok(false)
            }
            Err(e) => {
                tracing::error!(host = %self.host, error = %e, "the host's key does not match its pin; refusing to connect");
                Ok(false)
            }
        }
    }
}

/// Bridges a channel the host opened to the one `open` opens to the client
/// (in its own task): accepted and relayed when the client's opens, refused
/// otherwise.
fn bridge_to_client(
    channel: Channel<russh::client::Msg>,
    reply: russh::client::ChannelOpenHandle,
    open: impl std::future::Future<Output = Result<Channel<Msg>, russh::Error>> + Send + 'static,
) {
    tokio::spawn(async move {
        match open.await {
            Ok(c) => {
                reply.accept().await;
                pipe_channel(c, channel).await;
            }
            Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
        }
    });
}

type UpHandle = russh::client::Handle<Upstream>;

async fn connect_upstream(
    gate: &SshGate,
    client: server::Handle,
    session: Arc<Live>,
) -> Result<UpHandle, String> {
    let u = &gate.cfg.upstream;
    let (host, port) = match u.addr.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            p.parse::<u16>()
                .map_err(|_| format!("bad upstream port in {}", u.addr))?,
        ),
        None => (u.addr.clone(), 22),
    };
    let handler = Upstream {
        host: host.clone(),
        port,
        known_hosts: u.known_hosts.clone(),
        client,
        session,
        sidecar: gate.sidecar.clone(),
    };
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot reach the host {}: {e}", u.addr))?;
        let _ = tcp.set_nodelay(true);
        let mut h = russh::client::connect_stream(gate.client.clone(), tcp, handler)
            .await
            .map_err(|e| format!("SSH handshake with the host failed: {e}"))?;
        let ok = match &u.auth {
            UpstreamAuth::Key(k) => {
                let hash = h.best_supported_rsa_hash().await.ok().flatten().flatten();
                h.authenticate_publickey(&u.user, PrivateKeyWithHashAlg::new(k.clone(), hash))
                    .await
            }
            UpstreamAuth::Password(p) => h.authenticate_password(&u.user, p).await,
        }
        .map_err(|e| format!("login to the host failed: {e}"))?;
        if !ok.success() {
            return Err(format!(
                "the host refused the gate's credentials for {}",
                u.user
            ));
        }
        Ok(h)
    };
    tokio::time::timeout(Duration::from_secs(20), connect)
        .await
        .map_err(|_| "the host did not answer within 20s".to_string())?
}

/// One client connection.
struct Conn {
    gate: Arc<SshGate>,
    peer: SocketAddr,
    authed: Arc<AtomicBool>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    session: Option<Arc<Live>>,
    upstream: Arc<OnceCell<Result<UpHandle, String>>>,
    channels: Arc<AtomicUsize>,
    trace: Arc<std::sync::Mutex<Trace>>,
    agent: AgentGrants,
    user: String,
    kbd_tries: u32,
    /// A long token's parts so far (keyboard-interactive).
    kbd_token: String,
    kbd_parts: usize,
    /// Dropped with the connection: its channels' tasks stop waiting on
    /// holds for a client that went away.
    alive: tokio::sync::watch::Sender<()>,
}

/// Channels whose agent-forwarding request was decided, and how.
type AgentGrants = Arc<std::sync::Mutex<std::collections::HashMap<ChannelId, bool>>>;

impl Conn {
    /// Validates a token and opens the session.
    async fn login_token(&mut self, user: &str, token: &str) -> Auth {
        let token = token.trim();
        let addr = self.peer.to_string();
        let identity = match self.gate.sidecar.authenticate(token, &addr).await {
            Ok(i) => i,
            Err(e) => {
                tracing::info!(peer = %self.peer, error = %e, "ssh login refused");
                return Auth::reject();
            }
        };
        self.open(user, identity)
    }

    fn open(&mut self, user: &str, identity: wicket_identity::Identity) -> Auth {
        let app = format!("ssh:{user}");
        match self
            .gate
            .sidecar
            .open_session(&identity, &self.peer.to_string(), &app)
        {
            Ok(s) => {
                self.user = user.to_string();
                self.session = Some(Arc::new(Live::new(s, self.gate.sidecar.clone())));
                self.authed.store(true, Ordering::Release);
                self.permit.take();
                Auth::Accept
            }
            Err(d) => {
                tracing::info!(peer = %self.peer, rule = %d.rule, "ssh session refused: {}", d.reason);
                Auth::reject()
            }
        }
    }

    fn session(&self) -> Result<Arc<Live>, russh::Error> {
        self.session.clone().ok_or(russh::Error::NotAuthenticated)
    }

    async fn upstream(&self, handle: server::Handle) -> Result<&UpHandle, String> {
        let gate = self.gate.clone();
        let s = self.session.clone().ok_or("not signed in")?;
        self.upstream
            .get_or_init(|| async move { connect_upstream(&gate, handle, s).await })
            .await
            .as_ref()
            .map_err(Clone::clone)
    }

    fn ctx(&self, session: &Session) -> Result<Arc<Ctx>, russh::Error> {
        Ok(Arc::new(Ctx {
            gate: self.gate.clone(),
            session: self.session()?,
            handle: session.handle(),
            trace: self.trace.clone(),
            agent: self.agent.clone(),
            alive: self.alive.subscribe(),
        }))
    }

    /// Takes a channel slot, or `None` when the connection holds too many.
    fn slot(&self) -> Option<Slot> {
        let n = self.channels.fetch_add(1, Ordering::AcqRel);
        if n >= self.gate.cfg.max_channels {
            self.channels.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self.channels.clone()))
    }
}

/// Answers a client's channel open as the host answered the gate's: on
/// success accepts it and runs `relay` (holding `slot` until it ends), else
/// refuses it with the reason.
async fn answer_open<F, Fut>(
    reply: server::ChannelOpenHandle,
    up: Result<Channel<russh::client::Msg>, String>,
    slot: Slot,
    relay: F,
) where
    F: FnOnce(Channel<russh::client::Msg>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    match up {
        Ok(up) => {
            reply.accept().await;
            let run = relay(up);
            tokio::spawn(async move {
                let _slot = slot;
                run.await;
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a channel on the host");
            reply
                .reject(ChannelOpenFailure::Other {
                    code: 2,
                    reason: format!("wicket: {e}"),
                })
                .await;
        }
    }
}

/// A held channel slot, released on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A forwarding request as policy sees it: kind `forward`, its verb, and
/// the address it opens (none for agent forwarding).
fn forward_class(verb: &str, object: Option<&str>, risk: u32) -> Classification {
    Classification {
        kind: "forward".into(),
        verb: verb.into(),
        objects: object.map(str::to_string).into_iter().collect(),
        risk,
        ..Default::default()
    }
}

/// The connection's session.
pub(crate) type Live = wicket_sidecar::LiveSession;

/// The keyboard-interactive prompt. It says "Password" so tools that answer
/// password prompts (sshpass, expect scripts) recognise it.
pub const TOKEN_PROMPT: &str = "Password (Wicket access token): ";

/// OpenSSH's client reads at most this many bytes at a prompt (and from
/// SSH_ASKPASS); longer tokens arrive in parts.
pub const PART_BYTES: usize = 1023;

/// Most parts one token may come in.
const MAX_PARTS: usize = 16;

/// The prompt for part `n` (2, 3, …) of a long token (`wicket ssh askpass`
/// answers it with that part).
pub fn part_prompt(n: usize) -> String {
    format!("Password (Wicket access token, part {n}): ")
}

impl server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::reject())
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if password.len() == PART_BYTES {
            tracing::info!(peer = %self.peer, "a 1,023-byte password: likely a token cut by the client; \
                keyboard-interactive with `wicket ssh askpass` takes long tokens in parts");
        }
        Ok(self.login_token(user, password).await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        match response {
            None => {
                self.kbd_tries += 1;
                if self.kbd_tries > 3 {
                    return Ok(Auth::reject());
                }
                Ok(Auth::Partial {
                    name: "Wicket".into(),
                    instructions: "Sign in with an OIDC access token (`wicket login`).".into(),
                    prompts: vec![(TOKEN_PROMPT.into(), false)].into(),
                })
            }
            Some(mut r) => {
                let answer = r
                    .next()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                // OpenSSH cuts answers at 1,023 bytes: a part that long
                // may be followed by more (asked for with numbered prompts).
                let full = answer.len() == PART_BYTES;
                self.kbd_token.push_str(&answer);
                self.kbd_parts += 1;
                if full && self.kbd_parts < MAX_PARTS {
                    return Ok(Auth::Partial {
                        name: "Wicket".into(),
                        instructions: "".into(),
                        prompts: vec![(part_prompt(self.kbd_parts + 1).into(), false)].into(),
                    });
                }
                let token = std::mem::take(&mut self.kbd_token);
                self.kbd_parts = 0;
                if token.trim().is_empty() {
                    return Ok(Auth::reject());
                }
                Ok(self.login_token(user, &token).await)
            }
        }
    }

    // Plain public keys are never credentials (the default
    // `auth_publickey` refuses them); certificates signed by a trusted CA
    // are, through `auth_openssh_certificate`.

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        // The CAs configured here, and the control service's own (from the bundle).
        let mut cas = self.gate.cfg.user_cas.clone();
        if let Some(b) = self.gate.sidecar.bundles.current() {
            cas.extend(
                b.ssh_user_cas
                    .iter()
                    .filter_map(|k| PublicKey::from_openssh(k).ok()),
            );
        }
        match crate::cert::verify(certificate, &cas, now) {
            Ok(identity) => {
                let p = &identity.principal;
                if self
                    .gate
                    .sidecar
                    .bundles
                    .current()
                    .is_some_and(|b| b.is_revoked(&p.issuer, &p.subject))
                {
                    tracing::info!(peer = %self.peer, subject = %p.subject, "certificate of a revoked principal");
                    return Ok(Auth::reject());
                }
                Ok(self.open(user, identity))
            }
            Err(e) => {
                tracing::info!(peer = %self.peer, error = %e, "ssh certificate refused");
                let mut ev = wicket_core::AuditEvent {
                    id: wicket_sidecar::event_id(),
                    session_id: format!("auth-{}", uuid::Uuid::now_v7()),
                    seq: 1,
                    time: chrono::Utc::now(),
                    kind: AuditKind::AuthFailure,
                    connection: self.gate.sidecar.cfg.connection.clone(),
                    client_addr: self.peer.to_string(),
                    ..Default::default()
                };
                ev.details.insert("reason".into(), e);
                let _ = self.gate.sidecar.record(ev);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        // End the connection when the session is ended from outside.
        let s = self.session()?;
        let end = s.guard.end_signal();
        let handle = session.handle();
        tokio::spawn(async move {
            let reason = end.await;
            let _ = handle
                .disconnect(
                    Disconnect::ByApplication,
                    format!("wicket: {}", reason.message()),
                    "en".into(),
                )
                .await;
        });
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = self.slot() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let ctx = self.ctx(session)?;
        let up = match self.upstream(session.handle()).await {
            Ok(h) => h.channel_open_session().await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        answer_open(reply, up, slot, move |up| session_channel(ctx, channel, up)).await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = self.slot() else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let ctx = self.ctx(session)?;
        let dest = format!("{host}:{port}");
        let d = ctx.decide_now(
            &format!("forward {dest}"),
            forward_class("direct-tcpip", Some(&dest), 40),
        );
        if d.effect != Effect::Allow {
            reply
                .reject(ChannelOpenFailure::Other {
                    code: 1,
                    reason: format!("wicket: {} (rule {})", d.reason, d.rule),
                })
                .await;
            return Ok(());
        }
        let up = match self.upstream(session.handle()).await {
            Ok(h) => h
                .channel_open_direct_tcpip(host, port, originator_address, originator_port)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        answer_open(reply, up, slot, move |up| pipe_channel(channel, up)).await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _w: u32,
        _h: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn window_change_request(
        &mut self,
        _channel: ChannelId,
        _w: u32,
        _h: u32,
        _pw: u32,
        _ph: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _proto: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Agent forwarding lets the host use the caller's keys: only when
        // policy allows it (never held). The channel's task passes an
        // allowed request on to the host.
        let ctx = self.ctx(session)?;
        let d = ctx.decide_now("agent forwarding", forward_class("agent", None, 60));
        let ok = d.effect == Effect::Allow;
        self.agent.lock().expect("agent").insert(channel, ok);
        Ok(ok)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // A remote forward opens a door from the host's network to the
        // caller's: only when policy allows it (never held).
        let ctx = self.ctx(session)?;
        let listen = format!("{address}:{port}");
        let d = ctx.decide_now(
            &format!("remote forward {listen}"),
            forward_class("tcpip-forward", Some(&listen), 60),
        );
        if d.effect != Effect::Allow {
            return Ok(false);
        }
        match self.upstream(session.handle()).await {
            Ok(h) => match h.tcpip_forward(address, *port).await {
                Ok(bound) => {
                    if *port == 0 {
                        *port = bound;
                    }
                    Ok(true)
                }
                Err(e) => {
                    tracing::info!(error = %e, "the host refused a remote forward");
                    Ok(false)
                }
            },
            Err(_) => Ok(false),
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match self.upstream(session.handle()).await {
            Ok(h) => Ok(h.cancel_tcpip_forward(address, port).await.is_ok()),
            Err(_) => Ok(false),
        }
    }
}

/// What a channel's task needs of its connection.
struct Ctx {
    gate: Arc<SshGate>,
    session: Arc<Live>,
    handle: server::Handle,
    /// The connection's latest reasoning (for channels that carry no env).
    trace: Arc<std::sync::Mutex<Trace>>,
    /// Agent-forwarding decisions per channel.
    agent: AgentGrants,
    /// Closed when the client's connection ends.
    alive: tokio::sync::watch::Receiver<()>,
}

/// The caller's reasoning for a channel (`WICKET_REASONING`, `TRACEPARENT`).
type Trace = wicket_sidecar::CallerTrace;

impl Ctx {
    /// Decides a command (holding it for approval when policy says so),
    /// records the decision, and returns it with the command event's id.
    /// `notify` tells the caller about a hold.
    async fn decide(
        &self,
        text: &str,
        class: Classification,
        trace: &Trace,
        notify: Option<&ClientW>,
        extra: Option<(&str, String)>,
    ) -> (Decision, String) {
        let wait_note = |id: &str, d: &Decision| {
            if let Some(ch) = notify {
                let msg = format!(
                    "wicket: waiting for approval {id} (rule {}); an approver can allow or deny it\r\n",
                    d.rule
                );
                let ch = ch.make_writer_ext(Some(1));
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let mut ch = ch;
                    let _ = ch.write_all(msg.as_bytes()).await;
                    let _ = ch.flush().await;
                });
            }
        };
        let decided = self.gate.sidecar.decide_and_record(
            &self.session,
            self.command(text, class),
            trace,
            wait_note,
            extra.map(|(k, v)| (k.to_string(), v)),
        );
        // A client that goes away while its command is held does not get it
        // run later: the hold is dropped, and recorded as refused.
        let mut alive = self.alive.clone();
        tokio::select! {
            biased;
            r = decided => r,
            _ = alive.changed() => (
                Decision::deny("abandoned", wicket_sidecar::ABANDONED),
                String::new(),
            ),
        }
    }

    /// The command as recorded: its text with the detectors applied.
    fn command(&self, text: &str, class: Classification) -> Command {
        let text = match self.gate.masker() {
            Some(m) => m.mask(text).0.into_owned(),
            None => text.to_string(),
        };
        Command {
            text,
            classification: class,
        }
    }

    /// Decides a forwarding request, which is answered on the spot (under
    /// the connection's latest reasoning): a hold is a refusal. Recorded.
    fn decide_now(&self, text: &str, class: Classification) -> Decision {
        let trace = self.trace.lock().expect("trace").clone();
        let cmd = self.command(text, class);
        let mut d = self
            .gate
            .sidecar
            .decide(&self.session, &cmd, trace.has_reasoning());
        if d.effect == Effect::Review {
            d = Decision::deny(d.rule, "forwarding requests cannot be held for approval");
        }
        self.gate
            .sidecar
            .record_command(&self.session, cmd, d, &trace, None, [])
            .0
    }

    fn result(&self, command_id: &str, details: &[(&str, String)]) {
        let mut e = self.session.bare_event(AuditKind::CommandResult);
        e.details
            .insert("command_id".into(), command_id.to_string());
        for (k, v) in details {
            e.details.insert((*k).into(), v.clone());
        }
        if let Err(err) = self.gate.sidecar.record(e) {
            tracing::error!(error = %err, "cannot record a result");
        }
    }

    fn record_cast(
        &self,
        channel: ChannelId,
        key: &str,
        value: String,
        masked: &wicket_mask::Counts,
    ) {
        let mut e = self.session.bare_event(AuditKind::Output);
        e.details
            .insert("channel".into(), u32::from(channel).to_string());
        e.details.insert(key.into(), value);
        for (k, n) in masked.iter() {
            e.masked.insert(k.to_string(), n);
        }
        if let Err(err) = self.gate.sidecar.record(e) {
            tracing::error!(error = %err, "cannot record terminal output");
        }
    }
}

/// The client side of a channel, for writing.
type ClientW = russh::ChannelWriteHalf<Msg>;
/// The host side of a channel, for writing.
type UpW = russh::ChannelWriteHalf<russh::client::Msg>;

/// Refuses a channel's command: message on stderr, exit status 126.
async fn refuse(ch: &ClientW, d: &Decision) {
    let msg = format!("wicket: denied by rule {}: {}\r\n", d.rule, d.reason);
    let _ = ch.extended_data_bytes(1, Bytes::from(msg)).await;
    let _ = ch.exit_status(126).await;
    let _ = ch.eof().await;
    let _ = ch.close().await;
}

/// Runs both directions of a channel; when one ends, the other side is
/// closed and the other direction gets a few seconds to finish.
async fn both_ways(
    a: impl std::future::Future<Output = ()>,
    b: impl std::future::Future<Output = ()>,
    close_up: impl std::future::Future<Output = ()>,
    close_client: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(a, b);
    tokio::select! {
        _ = &mut a => {
            close_up.await;
            let _ = tokio::time::timeout(Duration::from_secs(5), b).await;
        }
        _ = &mut b => {
            close_client.await;
            let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
        }
    }
}

/// Copies one direction of a channel until EOF is passed on and the channel
/// closes, or a write fails.
async fn one_way<S>(from: &mut russh::ChannelReadHalf, to: &russh::ChannelWriteHalf<S>)
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    while let Some(m) = from.wait().await {
        match m {
            ChannelMsg::Data { data } => {
                let sent = to.data_bytes(data).await;
                if sent.is_err() {
                    break;
                }
            }
            ChannelMsg::Eof => {
                let _ = to.eof().await;
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
}

/// Relays a forwarded TCP channel, each direction on its own so a full
/// window one way never stalls the other.
async fn pipe_channel(client: Channel<Msg>, up: Channel<russh::client::Msg>) {
    let (mut cr, cw) = client.split();
    let (mut ur, uw) = up.split();
    let a = one_way(&mut cr, &uw);
    let b = one_way(&mut ur, &cw);
    both_ways(
        a,
        b,
        async {
            let _ = uw.close().await;
        },
        async {
            let _ = cw.close().await;
        },
    )
    .await;
}

/// What a session channel runs.
enum Mode {
    /// Nothing yet (pty and env requests only).
    Setup,
    /// An exec command.
    Exec {
        command_id: String,
        /// Its bytes are a file transfer: not recorded.
        transfer: bool,
    },
    /// A shell: lines are checked.
    Shell { editor: LineEditor },
    /// The sftp subsystem.
    Sftp {
        tracker: sftp::Tracker,
        from_client: sftp::Framer,
        from_host: sftp::Framer,
        command_id: String,
    },
    /// Refused: the channel is closing.
    Refused,
}

/// Whether an exec command is a file transfer's server side.
fn is_transfer(class: &Classification) -> bool {
    let argv = &class.argv;
    let prog = argv.first().map(|p| p.rsplit('/').next().unwrap_or(p));
    match prog {
        Some("scp") => argv.iter().any(|a| a == "-t" || a == "-f"),
        Some("rsync") => argv.iter().any(|a| a == "--server"),
        Some("sftp-server") => true,
        _ => false,
    }
}

use wicket_sidecar::recording::CAPTURE_LIMIT;

/// A session channel's state, shared by its two directions (locked only
/// between awaits).
struct Chan {
    mode: Mode,
    pty: Option<(String, u32, u32)>,
    recorder: Option<Recorder>,
    exit_status: Option<u32>,
    exit_signal: Option<String>,
    out_bytes: u64,
    in_bytes: u64,
    /// A shell without a terminal: the line typed so far, not yet sent.
    held_line: Vec<u8>,
}

impl Chan {
    fn record_batch(&mut self, ctx: &Ctx, id: ChannelId, force: bool) {
        if let Some(r) = self.recorder.as_mut() {
            if force {
                r.finish();
            }
            if let Some(batch) = r.take_batch(force) {
                let counts = std::mem::take(&mut r.counts);
                ctx.record_cast(id, "asciicast", batch, &counts);
            }
        }
    }
}

/// What the client→host direction does with a piece of input.
enum Step {
    Forward(Bytes),
    Line {
        text: String,
        uncertain: bool,
        enter: Bytes,
    },
}

async fn session_channel(ctx: Arc<Ctx>, client: Channel<Msg>, up: Channel<russh::client::Msg>) {
    let id = client.id();
    let (mut cr, cw) = client.split();
    let (mut ur, uw) = up.split();
    let state = std::sync::Mutex::new(Chan {
        mode: Mode::Setup,
        pty: None,
        recorder: None,
        exit_status: None,
        exit_signal: None,
        out_bytes: 0,
        in_bytes: 0,
        held_line: Vec::new(),
    });
    // Whole SFTP packets and messages must not interleave on the client side.
    let client_write = tokio::sync::Mutex::new(());
    let started = Instant::now();
    let (record_on, capture_output) = ctx.gate.recording();
    let lock = || state.lock().expect("channel state");

    // Client → host: requests, decisions, input.
    let a = async {
        // The connection's latest reasoning until this channel sends its own.
        let mut trace = ctx.trace.lock().expect("trace").clone();
        while let Some(m) = cr.wait().await {
            match m {
                ChannelMsg::RequestPty {
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                    ..
                } => {
                    // A client without a terminal of its own (`ssh -tt < file`) sends 0x0.
                    let (w, h) = if col_width == 0 || row_height == 0 {
                        (80, 24)
                    } else {
                        (col_width, row_height)
                    };
                    lock().pty = Some((term.clone(), w, h));
                    let _ = uw
                        .request_pty(
                            true,
                            &term,
                            col_width,
                            row_height,
                            pix_width,
                            pix_height,
                            &terminal_modes,
                        )
                        .await;
                }
                ChannelMsg::SetEnv {
                    variable_name,
                    variable_value,
                    ..
                } => {
                    match variable_name.as_str() {
                        "WICKET_REASONING" => trace.reasoning = Some(variable_value),
                        "TRACEPARENT" => trace.traceparent = Some(variable_value),
                        _ => {
                            let _ = uw.set_env(false, variable_name, variable_value).await;
                            continue;
                        }
                    }
                    *ctx.trace.lock().expect("trace") = trace.clone();
                }
                ChannelMsg::Exec { command, .. } => {
                    if !matches!(lock().mode, Mode::Setup) {
                        continue;
                    }
                    let text = String::from_utf8_lossy(&command).into_owned();
                    let class = classify::classify(&text);
                    let transfer = is_transfer(&class);
                    let (d, cid) = ctx.decide(&text, class, &trace, Some(&cw), None).await;
                    if d.effect != Effect::Allow {
                        lock().mode = Mode::Refused;
                        refuse(&cw, &d).await;
                        ctx.result(&cid, &[("exit_status", "126".into())]);
                        continue;
                    }
                    {
                        let mut st = lock();
                        if record_on && capture_output && !transfer {
                            let (term, w, h) =
                                st.pty.clone().unwrap_or_else(|| ("dumb".into(), 80, 24));
                            ctx.record_cast(
                                id,
                                "asciicast_header",
                                record::header(w, h, &term, Some(&text)),
                                &Default::default(),
                            );
                            st.recorder = Some(Recorder::new(ctx.gate.masker()));
                        }
                        st.mode = Mode::Exec {
                            command_id: cid,
                            transfer,
                        };
                    }
                    if uw.exec(true, command).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::RequestShell { .. } => {
                    if !matches!(lock().mode, Mode::Setup) {
                        continue;
                    }
                    let class = Classification {
                        kind: "shell".into(),
                        verb: "shell".into(),
                        risk: 30,
                        ..Default::default()
                    };
                    let (d, _) = ctx
                        .decide("<interactive shell>", class, &trace, Some(&cw), None)
                        .await;
                    if d.effect != Effect::Allow {
                        lock().mode = Mode::Refused;
                        refuse(&cw, &d).await;
                        continue;
                    }
                    {
                        let mut st = lock();
                        if record_on {
                            let (term, w, h) =
                                st.pty.clone().unwrap_or_else(|| ("dumb".into(), 80, 24));
                            ctx.record_cast(
                                id,
                                "asciicast_header",
                                record::header(w, h, &term, None),
                                &Default::default(),
                            );
                            st.recorder = Some(Recorder::new(ctx.gate.masker()));
                        }
                        let pty = st.pty.is_some();
                        st.mode = Mode::Shell {
                            editor: LineEditor::new(pty),
                        };
                    }
                    if uw.request_shell(true).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::RequestSubsystem { name, .. } => {
                    if !matches!(lock().mode, Mode::Setup) || name != "sftp" {
                        continue;
                    }
                    let class = Classification {
                        kind: "sftp".into(),
                        verb: "subsystem".into(),
                        risk: 30,
                        ..Default::default()
                    };
                    let (d, cid) = ctx
                        .decide("<sftp session>", class, &trace, None, None)
                        .await;
                    if d.effect != Effect::Allow {
                        lock().mode = Mode::Refused;
                        refuse(&cw, &d).await;
                        continue;
                    }
                    lock().mode = Mode::Sftp {
                        tracker: sftp::Tracker::default(),
                        from_client: sftp::Framer::default(),
                        from_host: sftp::Framer::default(),
                        command_id: cid,
                    };
                    if uw.request_subsystem(true, "sftp").await.is_err() {
                        break;
                    }
                }
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                } => {
                    if let Some(r) = lock().recorder.as_mut() {
                        r.resize(col_width, row_height)
                    }
                    let _ = uw
                        .window_change(col_width, row_height, pix_width, pix_height)
                        .await;
                }
                ChannelMsg::Signal { signal } => {
                    let _ = uw.signal(signal).await;
                }
                ChannelMsg::AgentForward { .. } => {
                    // The connection's handler decides (and answers); pass
                    // an allowed request on to the host.
                    let mut allowed = None;
                    for _ in 0..200 {
                        allowed = ctx.agent.lock().expect("agent").get(&id).copied();
                        if allowed.is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if allowed == Some(true) {
                        let _ = uw.agent_forward(false).await;
                    }
                }
                ChannelMsg::Data { data } => {
                    let go_on =
                        client_data(&ctx, &state, &trace, (&cw, &client_write), &uw, data).await;
                    if !go_on {
                        break;
                    }
                }
                ChannelMsg::ExtendedData { data, ext } => {
                    let _ = uw.extended_data_bytes(ext, data).await;
                }
                ChannelMsg::Eof => {
                    // A shell runs a last line that has no newline at EOF.
                    let last = std::mem::take(&mut lock().held_line);
                    if !last.is_empty() {
                        let text = String::from_utf8_lossy(&last).into_owned();
                        if decide_line(
                            &ctx,
                            &state,
                            &trace,
                            (&cw, &client_write),
                            &text,
                            false,
                            false,
                        )
                        .await
                        {
                            let _ = uw.data_bytes(Bytes::from(last)).await;
                        }
                    }
                    let _ = uw.eof().await;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
    };

    // Host → client: output, exit status, and the recording.
    let b = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = ur.wait() => {
                    let Some(m) = m else { break };
                    match m {
                        ChannelMsg::Data { data } => {
                            let packets = {
                                let mut st = lock();
                                st.out_bytes += data.len() as u64;
                                let capture = st.pty.is_some();
                                match &mut st.mode {
                                    Mode::Sftp { tracker, from_host, .. } => {
                                        let pkts = match from_host.push(&data) {
                                            Ok(p) => p,
                                            Err(e) => {
                                                tracing::warn!(error = %e, "malformed SFTP from the host; closing the channel");
                                                break;
                                            }
                                        };
                                        for pkt in &pkts {
                                            if let Some(c) = tracker.reply(pkt) {
                                                ctx.result(&c.command_id, &[("path", c.path), ("bytes_read", c.read.to_string()), ("bytes_written", c.written.to_string())]);
                                            }
                                        }
                                        Some(pkts)
                                    }
                                    mode => {
                                        if let Mode::Shell { editor } = mode {
                                            editor.saw_output(&data);
                                        }
                                        if let Some(r) = st.recorder.as_mut()
                                            && (capture || r.output_bytes < CAPTURE_LIMIT)
                                        {
                                            r.output(&data);
                                        }
                                        // A full batch goes now, not at the
                                        // next tick: under sustained output
                                        // batches (and memory) stay small.
                                        st.record_batch(&ctx, id, false);
                                        None
                                    }
                                }
                            };
                            match packets {
                                Some(pkts) => {
                                    for pkt in pkts {
                                        if !to_client(&client_write, &cw, pkt).await {
                                            return;
                                        }
                                    }
                                }
                                None => {
                                    if !to_client(&client_write, &cw, data).await {
                                        return;
                                    }
                                }
                            }
                        }
                        ChannelMsg::ExtendedData { data, ext } => {
                            {
                                let mut st = lock();
                                st.out_bytes += data.len() as u64;
                                let capture = st.pty.is_some();
                                if let Some(r) = st.recorder.as_mut()
                                    && (capture || r.output_bytes < CAPTURE_LIMIT)
                                {
                                    r.output(&data);
                                }
                                st.record_batch(&ctx, id, false);
                            }
                            if cw.extended_data_bytes(ext, data).await.is_err() {
                                break;
                            }
                        }
                        ChannelMsg::ExitStatus { exit_status: code } => {
                            lock().exit_status = Some(code);
                            let _ = cw.exit_status(code).await;
                        }
                        ChannelMsg::ExitSignal { signal_name, core_dumped, error_message, lang_tag } => {
                            lock().exit_signal = Some(format!("{signal_name:?}"));
                            let _ = ctx.handle.exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag).await;
                        }
                        ChannelMsg::Eof => {
                            let _ = cw.eof().await;
                        }
                        ChannelMsg::Close => break,
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    let mut st = lock();
                    if let Some(r) = st.recorder.as_mut() {
                        r.tick(Duration::from_millis(200));
                    }
                    st.record_batch(&ctx, id, false);
                }
            }
        }
    };
    both_ways(
        a,
        b,
        async {
            let _ = uw.close().await;
        },
        async {
            let _ = cw.close().await;
        },
    )
    .await;

    let mut st = state.into_inner().unwrap_or_else(|e| e.into_inner());
    st.record_batch(&ctx, id, true);
    let mut details = vec![
        ("bytes_in", st.in_bytes.to_string()),
        ("bytes_out", st.out_bytes.to_string()),
        ("duration_ms", started.elapsed().as_millis().to_string()),
    ];
    if let Some(c) = st.exit_status {
        details.push(("exit_status", c.to_string()));
    }
    if let Some(s) = st.exit_signal.take() {
        details.push(("exit_signal", s));
    }
    match st.mode {
        Mode::Exec {
            command_id,
            transfer,
        } => {
            if transfer {
                details.push(("transfer", "true".into()));
            }
            ctx.result(&command_id, &details);
        }
        Mode::Sftp {
            mut tracker,
            command_id,
            ..
        } => {
            for c in tracker.open_handles() {
                ctx.result(
                    &c.command_id,
                    &[
                        ("path", c.path),
                        ("bytes_read", c.read.to_string()),
                        ("bytes_written", c.written.to_string()),
                        ("unclosed", "true".into()),
                    ],
                );
            }
            ctx.result(&command_id, &details);
        }
        _ => {}
    }
    let _ = uw.close().await;
    let _ = cw.close().await;
}

/// Writes whole to the client (SFTP packets and gate messages never
/// interleave with the host's output).
async fn to_client(serial: &tokio::sync::Mutex<()>, cw: &ClientW, data: Bytes) -> bool {
    let _g = serial.lock().await;
    cw.data_bytes(data).await.is_ok()
}

/// The longest line held back from a shell without a terminal; a longer one
/// is decided as it stands (uncertain).
const HELD_LINE_MAX: usize = 64 * 1024;

/// Decides a line typed in a shell; when it is refused, says so to the
/// client (on the terminal, or on stderr without one). True: let it run.
async fn decide_line(
    ctx: &Ctx,
    state: &std::sync::Mutex<Chan>,
    trace: &Trace,
    (cw, serial): (&ClientW, &tokio::sync::Mutex<()>),
    text: &str,
    uncertain: bool,
    pty: bool,
) -> bool {
    let class = classify::classify(text);
    let extra = uncertain.then(|| ("uncertain", "true".to_string()));
    let (d, _) = ctx.decide(text, class, trace, Some(cw), extra).await;
    if d.effect == Effect::Allow {
        return true;
    }
    let msg = if pty {
        format!("\r\nwicket: denied by rule {}: {}\r\n", d.rule, d.reason)
    } else {
        format!("wicket: denied by rule {}: {}\n", d.rule, d.reason)
    };
    if let Some(r) = state.lock().expect("channel state").recorder.as_mut() {
        r.output(msg.as_bytes());
    }
    if pty {
        let _ = to_client(serial, cw, Bytes::from(msg)).await;
    } else {
        let _g = serial.lock().await;
        let _ = cw.extended_data_bytes(1, Bytes::from(msg)).await;
    }
    false
}

/// Handles input from the client; false when the channel should end.
async fn client_data(
    ctx: &Ctx,
    state: &std::sync::Mutex<Chan>,
    trace: &Trace,
    (cw, serial): (&ClientW, &tokio::sync::Mutex<()>),
    uw: &UpW,
    data: Bytes,
) -> bool {
    let lock = || state.lock().expect("channel state");
    enum Plan {
        Steps(Vec<Step>, bool),
        Sftp(Vec<Bytes>),
        Raw,
        Drop,
    }
    let plan = {
        let mut st = lock();
        st.in_bytes += data.len() as u64;
        match &mut st.mode {
            Mode::Shell { editor } => {
                let secret = !editor.checking();
                let steps = editor
                    .feed(&data)
                    .into_iter()
                    .map(|p| match p {
                        Piece::Bytes(a, b) => Step::Forward(data.slice(a..b)),
                        Piece::Line {
                            text,
                            uncertain,
                            enter,
                        } => Step::Line {
                            text,
                            uncertain,
                            enter: data.slice(enter..enter + 1),
                        },
                    })
                    .collect();
                Plan::Steps(steps, secret)
            }
            Mode::Sftp { from_client, .. } => match from_client.push(&data) {
                Ok(p) => Plan::Sftp(p),
                Err(e) => {
                    tracing::warn!(error = %e, "malformed SFTP from the client; closing the channel");
                    return false;
                }
            },
            Mode::Exec { .. } | Mode::Setup => Plan::Raw,
            Mode::Refused => Plan::Drop,
        }
    };
    match plan {
        Plan::Drop => true,
        Plan::Raw => uw.data_bytes(data).await.is_ok(),
        Plan::Steps(steps, secret) => {
            let pty = lock().pty.is_some();
            for step in steps {
                match step {
                    Step::Forward(b) => {
                        let held = {
                            let mut st = lock();
                            if let Some(r) = st.recorder.as_mut() {
                                r.input(&b, secret)
                            }
                            if !pty {
                                // Without a terminal, bytes sent are bytes the
                                // shell runs: the line waits for its decision.
                                st.held_line.extend_from_slice(&b);
                            }
                            st.held_line.len()
                        };
                        if pty {
                            if uw.data_bytes(b).await.is_err() {
                                return false;
                            }
                        } else if held > HELD_LINE_MAX {
                            let line = std::mem::take(&mut lock().held_line);
                            let text = String::from_utf8_lossy(&line).into_owned();
                            let go = decide_line(ctx, state, trace, (cw, serial), &text, true, pty)
                                .await;
                            if go && uw.data_bytes(Bytes::from(line)).await.is_err() {
                                return false;
                            }
                        }
                    }
                    Step::Line {
                        text,
                        uncertain,
                        enter,
                    } => {
                        let held = {
                            let mut st = lock();
                            if let Some(r) = st.recorder.as_mut() {
                                r.input(&enter, false)
                            }
                            std::mem::take(&mut st.held_line)
                        };
                        let go = text.trim().is_empty()
                            || decide_line(ctx, state, trace, (cw, serial), &text, uncertain, pty)
                                .await;
                        if go {
                            let mut out = held;
                            out.extend_from_slice(&enter);
                            if uw.data_bytes(Bytes::from(out)).await.is_err() {
                                return false;
                            }
                        } else if pty {
                            // Kill the typed line in the shell (end of line,
                            // then kill to its start), without an Enter.
                            let _ = uw.data_bytes(Bytes::from_static(b"\x05\x15")).await;
                        }
                    }
                }
            }
            true
        }
        Plan::Sftp(pkts) => {
            for pkt in pkts {
                let op = match &lock().mode {
                    Mode::Sftp { tracker, .. } => tracker.operation(&pkt),
                    _ => None,
                };
                let mut cid = None;
                if let Some(op) = op {
                    let class = Classification {
                        kind: "sftp".into(),
                        verb: op.verb.into(),
                        objects: op.paths.clone(),
                        risk: if op.writes { 40 } else { 15 },
                        ..Default::default()
                    };
                    let text = format!("{} {}", op.verb, op.paths.join(" "));
                    let extra = (op.verb == "open")
                        .then(|| ("mode", if op.writes { "write" } else { "read" }.to_string()));
                    let (d, id) = ctx.decide(&text, class, trace, None, extra).await;
                    if d.effect != Effect::Allow {
                        let msg = format!("wicket: denied by rule {}: {}", d.rule, d.reason);
                        if !to_client(serial, cw, sftp::permission_denied(op.id, &msg)).await {
                            return false;
                        }
                        continue;
                    }
                    cid = Some(id);
                }
                if let Mode::Sftp { tracker, .. } = &mut lock().mode {
                    tracker.request(&pkt, cid.as_deref());
                }
                if uw.data_bytes(pkt).await.is_err() {
                    return false;
                }
            }
            true
        }
    }
}
