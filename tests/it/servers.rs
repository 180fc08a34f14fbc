//! Real servers for the remote-target tests, each started on free loopback ports and stopped
//! on drop: Apache httpd with mod_dav (HTTPS, Basic auth), `rclone serve webdav` (a second,
//! different WebDAV server), tinyproxy (a forward proxy), moto (an S3 server that checks
//! SigV4 signatures), and an in-process fault server (a faulty reverse proxy in front of
//! rclone, or a scripted WebDAV server) for the faults no real server produces on demand.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common::{Pki, free_port, spawn_group, stop_group};

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what} did not start: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A tempdir that daemons dropping privileges (www-data, nobody) can traverse.
fn open_tempdir() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

pub const DAV_USER: &str = "backup";

/// Apache httpd serving WebDAV over HTTPS at `/dav/`, with Basic auth.
pub struct Apache {
    pub port: u16,
    pub dir: TempDir,
    pub pki: Pki,
    pub password: String,
    child: Child,
}

impl Apache {
    pub fn start() -> Apache {
        Apache::start_with(false)
    }

    /// With `require_client_cert`, TLS also demands a client certificate signed by the
    /// test CA (the client certificate of `self.pki`).
    pub fn start_with(require_client_cert: bool) -> Apache {
        let dir = open_tempdir();
        let d = dir.path();
        let pki = Pki::new(d, "apache");
        let port = free_port();
        for sub in ["www/dav", "lock", "run"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let status = Command::new("chown")
            .args(["-R", "www-data:www-data"])
            .arg(d.join("www"))
            .arg(d.join("lock"))
            .status()
            .unwrap();
        assert!(status.success());
        let password = format!("pw-{:x}-secret", rand_u64());
        let out = Command::new("htpasswd")
            .args(["-cbB"])
            .arg(d.join("htpasswd"))
            .arg(DAV_USER)
            .arg(&password)
            .output()
            .expect("htpasswd (Debian package apache2-utils)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::set_permissions(d.join("htpasswd"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let m = "/usr/lib/apache2/modules";
        let conf = format!(
            r#"ServerName localhost
Listen 127.0.0.1:{port}
PidFile {d}/run/httpd.pid
DefaultRuntimeDir {d}/run
Mutex file:{d}/run default
ErrorLog {d}/error.log
LogLevel warn
LogFormat "%h \"%r\" %>s %b" short
CustomLog {d}/access.log short
LoadModule mpm_event_module {m}/mod_mpm_event.so
LoadModule authn_core_module {m}/mod_authn_core.so
LoadModule authz_core_module {m}/mod_authz_core.so
LoadModule authn_file_module {m}/mod_authn_file.so
LoadModule auth_basic_module {m}/mod_auth_basic.so
LoadModule authz_user_module {m}/mod_authz_user.so
LoadModule dav_module {m}/mod_dav.so
LoadModule dav_fs_module {m}/mod_dav_fs.so
LoadModule ssl_module {m}/mod_ssl.so
User www-data
Group www-data
LimitRequestBody 0
DocumentRoot {d}/www
DavLockDB {d}/lock/DavLock
SSLEngine on
SSLCertificateFile {cert}
SSLCertificateKeyFile {key}
{client_auth}
<Directory {d}/www>
  Require all granted
</Directory>
<Location /dav/>
  Dav On
  AuthType Basic
  AuthName "etcd backups"
  AuthUserFile {d}/htpasswd
  Require valid-user
</Location>
"#,
            d = d.display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
            client_auth = if require_client_cert {
                format!("SSLVerifyClient require\nSSLCACertificateFile {}", pki.ca.display())
            } else {
                String::new()
            },
        );
        std::fs::write(d.join("httpd.conf"), conf).unwrap();
        let child = spawn_group(
            Command::new("apache2")
                .arg("-f")
                .arg(d.join("httpd.conf"))
                .arg("-DFOREGROUND")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("stderr.log")).unwrap()),
        )
        .expect("apache2 (Debian package apache2)");
        wait_for_port(port, "apache2", &d.join("stderr.log"));
        Apache {
            port,
            dir,
            pki,
            password,
            child,
        }
    }

    /// Sets the nice value of every Apache process and thread (its process group), now and
    /// for the workers it starts later (the benchmark's stand-in for a remote server).
    #[allow(dead_code)]
    pub fn renice(&self, nice: i32) {
        // SAFETY: setpriority with integer arguments; the group is the one spawn_group made.
        let rc = unsafe { libc::setpriority(libc::PRIO_PGRP, self.child.id() as libc::id_t, nice) };
        assert_eq!(rc, 0, "setpriority: {}", std::io::Error::last_os_error());
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/dav/", self.port)
    }

    /// The directory behind `/dav/`.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("www/dav")
    }

    /// A password file for the target, mode 0600.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        let p = dir.join("dav.password");
        std::fs::write(&p, format!("{}\n", self.password)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        // SIGTERM: the parent stops its workers and exits; the group kill catches stragglers.
        stop_group(&mut self.child, true);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

/// `rclone serve webdav` on plain http, no auth.
pub struct Rclone {
    pub port: u16,
    pub dir: TempDir,
    child: Child,
}

impl Rclone {
    pub fn start() -> Rclone {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("data")).unwrap();
        std::fs::write(d.join("rclone.conf"), "").unwrap();
        let port = free_port();
        let child = spawn_group(
            Command::new("rclone")
                .args(["serve", "webdav"])
                .arg(d.join("data"))
                .arg("--addr")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--config")
                .arg(d.join("rclone.conf"))
                // The tests change files behind rclone's back; it must not serve a stale listing.
                .args(["--dir-cache-time", "0s"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("rclone.log")).unwrap()),
        )
        .expect("rclone (Debian package rclone)");
        wait_for_port(port, "rclone", &d.join("rclone.log"));
        Rclone { port, dir, child }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Rclone {
    fn drop(&mut self) {
        stop_group(&mut self.child, true);
    }
}

/// tinyproxy, a real forward proxy (CONNECT for https).
pub struct Tinyproxy {
    pub port: u16,
    pub dir: TempDir,
    child: Child,
}

impl Tinyproxy {
    pub fn start() -> Tinyproxy {
        Tinyproxy::start_with(None)
    }

    /// With `auth`, the proxy demands Basic credentials `(user, password)`.
    pub fn start_with(auth: Option<(&str, &str)>) -> Tinyproxy {
        let dir = open_tempdir();
        let d = dir.path();
        let port = free_port();
        let log = d.join("tinyproxy.log");
        std::fs::write(&log, "").unwrap();
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
        let conf = format!(
            "User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 600\nLogFile \"{}\"\nLogLevel Info\nMaxClients 50\n{}",
            log.display(),
            auth.map(|(u, p)| format!("BasicAuth {u} {p}\n")).unwrap_or_default()
        );
        std::fs::write(d.join("tinyproxy.conf"), conf).unwrap();
        let child = spawn_group(
            Command::new("tinyproxy")
                .arg("-d")
                .arg("-c")
                .arg(d.join("tinyproxy.conf"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("stderr.log")).unwrap()),
        )
        .expect("tinyproxy (Debian package tinyproxy)");
        wait_for_port(port, "tinyproxy", &d.join("stderr.log"));
        Tinyproxy { port, dir, child }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many requests the proxy has handled (its log names each one).
    pub fn requests(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Request (file descriptor"))
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        stop_group(&mut self.child, true);
    }
}

/// What the faulty proxy does with request number `n` (0-based).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Pass it to the upstream server.
    Forward,
    /// Answer with this status and body.
    Respond(u16, String),
    /// Read part of the request body, then drop the connection.
    CutBody,
    /// Read the request and never answer.
    Stall,
    /// Answer 207 with a body of this many bytes, sent without a length, until the client
    /// stops reading.
    Endless,
    /// Read the request body slowly (16 KiB per pause), then forward it.
    Slow(Duration),
    /// Forward the request, then drop the connection without passing the answer on: the
    /// request took effect but its answer was lost.
    ForwardThenCut,
    /// Answer 429 with `Retry-After: <secs>`.
    TooMany(u64),
    /// Answer with this status, extra headers and body (with its true Content-Length).
    Answer(u16, Vec<(String, String)>, Vec<u8>),
    /// Answer 200 declaring `declared` bytes, send `body`, then close.
    Short { declared: usize, body: Vec<u8> },
    /// Answer 200 without a length, zeros until the client goes away.
    EndlessFile,
    /// Send `raw` (status line, headers, body): the first `at_once` bytes at once, then one
    /// byte every `pause`: a slow-loris answer.
    Dribble {
        raw: Vec<u8>,
        at_once: usize,
        pause: Duration,
    },
}

/// Request number, method, path and the `Authorization` header, if any.
type Plan = Arc<dyn Fn(usize, &str, &str, Option<&str>) -> Fault + Send + Sync>;

/// An in-process HTTP/1.1 server in front of a real WebDAV server that injects faults.
/// Every answer closes its connection, so request boundaries stay simple. Request bodies
/// (with a Content-Length or chunked) are read whole before the answer.
pub struct FaultProxy {
    pub port: u16,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FaultProxy {
    pub async fn start(
        upstream: String,
        plan: impl Fn(usize, &str, &str, Option<&str>) -> Fault + Send + Sync + 'static,
    ) -> FaultProxy {
        FaultProxy::serve(Some(upstream), Arc::new(plan)).await
    }

    /// A scripted server: `route(method, path)` decides each answer. `Forward` passes the
    /// request to `upstream`; without one it is answered 502.
    pub async fn scripted(
        upstream: Option<String>,
        route: impl Fn(&str, &str) -> Fault + Send + Sync + 'static,
    ) -> FaultProxy {
        FaultProxy::serve(upstream, Arc::new(move |_, method, path, _| route(method, path))).await
    }

    async fn serve(upstream: Option<String>, plan: Plan) -> FaultProxy {
        etcd_backupd::targets::webdav::install_crypto_provider();
        // A small receive buffer, so that what the client has sent is close to what this
        // server has read: the slow-reader fault then really slows the sender.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let c = count.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                let sock = tokio::select! {
                    s = listener.accept() => s.unwrap().0,
                    _ = &mut stopped => return,
                };
                let (plan, c, client, upstream) = (plan.clone(), c.clone(), client.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve_one(sock, plan, c, client, upstream).await;
                });
            }
        });
        FaultProxy { port, _stop: stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// Forwards everything but the first snapshot upload, which never gets an answer; the
    /// flag tells when that upload has arrived.
    pub async fn stalling_first_snapshot(upstream: String) -> (FaultProxy, Arc<std::sync::atomic::AtomicBool>) {
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stalled.clone();
        let proxy = FaultProxy::start(upstream, move |_, method, path, _| {
            if method == "PUT" && path.contains("snapshot_") && !s.swap(true, Ordering::SeqCst) {
                Fault::Stall
            } else {
                Fault::Forward
            }
        })
        .await;
        (proxy, stalled)
    }
}

async fn serve_one(
    mut sock: tokio::net::TcpStream,
    plan: Plan,
    count: Arc<AtomicUsize>,
    client: reqwest::Client,
    upstream: Option<String>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if sock.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        first.next().unwrap_or_default().to_string(),
        first.next().unwrap_or_default().to_string(),
    );
    let mut headers = Vec::new();
    let mut length = 0usize;
    let mut chunked = false;
    for l in lines.filter(|l| !l.is_empty()) {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
            if k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let n = count.fetch_add(1, Ordering::SeqCst);
    let authorization = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.as_str());
    let fault = plan(n, &method, &path, authorization);
    if let Fault::CutBody = fault {
        let mut part = vec![0u8; if chunked { 2048 } else { length.min(4096) / 2 }];
        let _ = sock.read_exact(&mut part).await;
        return Ok(()); // drop: the connection is cut mid-body
    }
    let pause = match fault {
        Fault::Slow(p) => Some(p),
        _ => None,
    };
    let body = if chunked {
        read_chunked(&mut sock, pause).await?
    } else {
        read_slowly(&mut sock, length, pause).await?
    };
    match fault {
        Fault::Forward | Fault::Slow(_) | Fault::ForwardThenCut => {
            let Some(upstream) = upstream else {
                return answer(&mut sock, 502, &[], b"no upstream").await;
            };
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut rb = client
                .request(m, format!("{}{}", upstream.trim_end_matches('/'), path))
                .body(body);
            for (k, v) in &headers {
                let lk = k.to_ascii_lowercase();
                if lk == "host" || lk == "content-length" || lk == "connection" || lk == "transfer-encoding" {
                    continue;
                }
                // MOVE names its destination by absolute URL: point it at the upstream.
                let v = if lk == "destination" {
                    v.replace(
                        &format!("127.0.0.1:{}", sock.local_addr()?.port()),
                        upstream.trim_start_matches("http://").trim_end_matches('/'),
                    )
                } else {
                    v.clone()
                };
                rb = rb.header(k, v);
            }
            let resp = match rb.send().await {
                Ok(r) => r,
                Err(_) => return Ok(()),
            };
            if let Fault::ForwardThenCut = fault {
                return Ok(());
            }
            let status = resp.status();
            let bytes = resp.bytes().await.unwrap_or_default();
            let out = format!(
                "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                bytes.len()
            );
            sock.write_all(out.as_bytes()).await?;
            sock.write_all(&bytes).await?;
        }
        Fault::Respond(code, text) => {
            let html = [("Content-Type".to_string(), "text/html".to_string())];
            return answer(&mut sock, code, &html, text.as_bytes()).await;
        }
        Fault::Answer(code, headers, body) => return answer(&mut sock, code, &headers, &body).await,
        Fault::Short { declared, body } => {
            let out = format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n");
            sock.write_all(out.as_bytes()).await?;
            sock.write_all(&body).await?;
        }
        Fault::EndlessFile => {
            sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
                .await?;
            let chunk = vec![0u8; 64 * 1024];
            loop {
                sock.write_all(&chunk).await?;
            }
        }
        Fault::Dribble { raw, at_once, pause } => {
            let at_once = at_once.min(raw.len());
            sock.write_all(&raw[..at_once]).await?;
            for b in &raw[at_once..] {
                sock.write_all(&[*b]).await?;
                tokio::time::sleep(pause).await;
            }
        }
        Fault::TooMany(secs) => {
            let out = format!(
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: {secs}\r\nContent-Length: 4\r\nConnection: close\r\n\r\nslow"
            );
            sock.write_all(out.as_bytes()).await?;
        }
        Fault::Stall => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Fault::Endless => {
            sock.write_all(b"HTTP/1.1 207 Multi-Status\r\nContent-Type: application/xml\r\nConnection: close\r\n\r\n<multistatus xmlns=\"DAV:\">").await?;
            let chunk = vec![b' '; 64 * 1024];
            loop {
                sock.write_all(&chunk).await?;
            }
        }
        Fault::CutBody => unreachable!(),
    }
    sock.shutdown().await
}

/// Writes an answer with `code`, `headers` and `body` (and its length), and closes.
async fn answer(
    sock: &mut tokio::net::TcpStream,
    code: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut out = format!("HTTP/1.1 {code} Fault\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()));
    sock.write_all(out.as_bytes()).await?;
    sock.write_all(body).await?;
    sock.shutdown().await
}

/// A PROPFIND 207 body: each entry an href and a size (None: a collection).
pub fn multistatus(entries: &[(String, Option<u64>)]) -> Vec<u8> {
    let mut x = String::from(r#"<?xml version="1.0" encoding="utf-8"?><D:multistatus xmlns:D="DAV:">"#);
    for (href, size) in entries {
        let props = match size {
            None => "<D:resourcetype><D:collection/></D:resourcetype>".to_string(),
            Some(n) => format!("<D:resourcetype/><D:getcontentlength>{n}</D:getcontentlength>"),
        };
        x.push_str(&format!(
            "<D:response><D:href>{href}</D:href><D:propstat><D:prop>{props}</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
        ));
    }
    x.push_str("</D:multistatus>");
    x.into_bytes()
}

/// Reads `n` bytes, pausing after every 16 KiB when `pause` is set (a slow reader).
async fn read_slowly(sock: &mut tokio::net::TcpStream, n: usize, pause: Option<Duration>) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut body = vec![0u8; n];
    for chunk in body.chunks_mut(16 * 1024) {
        sock.read_exact(chunk).await?;
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
        }
    }
    Ok(body)
}

/// Reads one CRLF-terminated line.
async fn read_line(sock: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        let mut b = [0u8; 1];
        if sock.read(&mut b).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line[..line.len() - 2]).to_string())
}

/// Decodes a chunked request body (the pipelined upload sends one: its length is not known
/// when it starts).
async fn read_chunked(sock: &mut tokio::net::TcpStream, pause: Option<Duration>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(sock).await?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size line {line:?}")))?;
        if size == 0 {
            while !read_line(sock).await?.is_empty() {}
            return Ok(body);
        }
        body.extend(read_slowly(sock, size, pause).await?);
        read_line(sock).await?;
    }
}

/// Where `scripts/install-deps.sh` puts moto's venv: `$MOTO_VENV`, by default
/// `/usr/local/lib/moto-venv`. Panics when it is missing: the S3 tests fail rather than skip.
pub fn moto_venv() -> PathBuf {
    let venv = std::env::var_os("MOTO_VENV")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/moto-venv"));
    assert!(
        venv.join("bin/moto_server").is_file(),
        "moto's server is not in {} ($MOTO_VENV): run scripts/install-deps.sh",
        venv.display()
    );
    venv
}

/// moto's S3 server over HTTPS (a test CA's certificate) with IAM auth on: after the three
/// unauthenticated requests that create the user `backup`, its access key and an allow-all
/// policy, every request must carry a valid SigV4 signature by a key moto issued, or it is
/// refused (`SignatureDoesNotMatch`, `InvalidAccessKeyId`). The bucket `backups` exists.
pub struct Moto {
    pub port: u16,
    pub dir: TempDir,
    pub pki: Pki,
    pub access_key: String,
    pub secret_key: String,
    child: Child,
}

/// What every [`Moto::py`] script starts with: boto3 clients for the server (`client(svc)`,
/// `s3` with the issued key).
const MOTO_PRELUDE: &str = r#"
import json, os, sys, time
import boto3
from botocore.config import Config
kw = dict(endpoint_url=os.environ["MOTO_ENDPOINT"], region_name="us-east-1",
          verify=os.environ["MOTO_CA"], config=Config(s3={"addressing_style": "path"}))
def client(svc, ak=os.environ.get("MOTO_AK", "none"), sk=os.environ.get("MOTO_SK", "none")):
    return boto3.client(svc, aws_access_key_id=ak, aws_secret_access_key=sk, **kw)
s3 = client("s3")
"#;

impl Moto {
    pub fn start() -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pki = Pki::new(d, "moto");
        let port = free_port();
        let child = spawn_group(
            Command::new(moto_venv().join("bin/moto_server"))
                .args(["-H", "127.0.0.1", "-p", &port.to_string(), "-s", "-c"])
                .arg(&pki.server_cert)
                .arg("-k")
                .arg(&pki.server_key)
                .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
                // Parts as small as the tests' `part_size`.
                .env("S3_UPLOAD_PART_MIN_SIZE", "65536")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("moto.log")).unwrap()),
        )
        .expect("moto_server (scripts/install-deps.sh)");
        wait_for_port(port, "moto_server", &d.join("moto.log"));
        let mut moto = Moto {
            port,
            dir,
            pki,
            access_key: String::new(),
            secret_key: String::new(),
            child,
        };
        let out = moto.py(r#"
iam = client("iam")
iam.create_user(UserName="backup")
k = iam.create_access_key(UserName="backup")["AccessKey"]
iam.put_user_policy(UserName="backup", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
client("s3", k["AccessKeyId"], k["SecretAccessKey"]).create_bucket(Bucket="backups")
print(k["AccessKeyId"], k["SecretAccessKey"])
"#);
        let (ak, sk) = out.trim().split_once(' ').expect("moto issued a key");
        moto.access_key = ak.to_string();
        moto.secret_key = sk.to_string();
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Runs a Python script (after [`MOTO_PRELUDE`]) against the server with boto3 and the
    /// issued key; returns its stdout, panicking if it fails.
    pub fn py(&self, script: &str) -> String {
        let out = Command::new(moto_venv().join("bin/python"))
            .arg("-c")
            .arg(format!("{MOTO_PRELUDE}{script}"))
            .env("MOTO_ENDPOINT", self.endpoint())
            .env("MOTO_CA", &self.pki.ca)
            .env("MOTO_AK", &self.access_key)
            .env("MOTO_SK", &self.secret_key)
            .env("HTTPS_PROXY", "")
            .env("https_proxy", "")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python: {}\nmoto: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("moto.log"))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every object in `bucket` as (key, size), sorted.
    pub fn objects(&self, bucket: &str) -> Vec<(String, u64)> {
        let out = self.py(&format!(
            r#"
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="{bucket}"):
    for o in page.get("Contents", []):
        print(o["Key"], o["Size"])
"#
        ));
        let mut v: Vec<(String, u64)> = out
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(k, s)| (k.to_string(), s.parse().unwrap()))
            .collect();
        v.sort();
        v
    }

    /// The keys of the multipart uploads in progress in `bucket`.
    pub fn uploads(&self, bucket: &str) -> Vec<String> {
        let out = self.py(&format!(
            "for u in s3.list_multipart_uploads(Bucket=\"{bucket}\").get(\"Uploads\", []):\n    print(u[\"Key\"])\n"
        ));
        out.lines().map(str::to_string).collect()
    }

    /// The access and secret key files for a target (0600), with `secret` as the secret key.
    pub fn key_files(&self, dir: &Path, secret: &str) -> (PathBuf, PathBuf) {
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, format!("{text}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p
        };
        (write("s3.access-key", &self.access_key), write("s3.secret-key", secret))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        stop_group(&mut self.child, false);
    }
}

/// s3s-fs (crates.io, `--features binary`): a second S3 server, over plain HTTP on
/// loopback, that checks every request's SigV4 signature against its one key and keeps
/// objects as files under `root/<bucket>/`. It lacks operations moto has: it answers
/// `501 Not Implemented` to `ListMultipartUploads`. The bucket `backups` exists.
pub struct S3sFs {
    pub port: u16,
    pub dir: TempDir,
    pub access_key: String,
    pub secret_key: String,
    child: Child,
}

impl S3sFs {
    pub fn start() -> S3sFs {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("backups")).unwrap();
        let (access_key, secret_key) = (
            "AKIDS3SFSTEST".to_string(),
            format!("s3s-{:016x}", rand::random::<u64>()),
        );
        let port = free_port();
        let log = dir.path().join("s3s-fs.log");
        let child = spawn_group(
            Command::new("s3s-fs")
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", &access_key, "--secret-key", &secret_key])
                .arg(&root)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        )
        .expect("s3s-fs 0.14.1 (scripts/install-deps.sh --supply-chain)");
        wait_for_port(port, "s3s-fs", &log);
        S3sFs {
            port,
            dir,
            access_key,
            secret_key,
            child,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the server keeps the bucket's objects, read directly (not through etcd-backupd).
    pub fn bucket_dir(&self) -> PathBuf {
        self.dir.path().join("root/backups")
    }

    /// What it printed (for a failure's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("s3s-fs.log")).unwrap_or_default()
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        stop_group(&mut self.child, false);
    }
}
