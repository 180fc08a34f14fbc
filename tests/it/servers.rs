//! Real servers for the remote-target tests, each started on free loopback ports and stopped
//! on drop: Apache httpd with mod_dav (HTTPS, Basic auth), `rclone serve webdav` (a second,
//! different WebDAV server), tinyproxy (a forward proxy), and an in-process "faulty reverse
//! proxy" in front of rclone for the faults no real server produces on demand.

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
}

/// Request number, method, path and the `Authorization` header, if any.
type Plan = Arc<dyn Fn(usize, &str, &str, Option<&str>) -> Fault + Send + Sync>;

/// An in-process HTTP/1.1 server in front of a real WebDAV server that injects faults.
/// Every answer closes its connection, so request boundaries stay simple.
pub struct FaultProxy {
    pub port: u16,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FaultProxy {
    pub async fn start(
        upstream: String,
        plan: impl Fn(usize, &str, &str, Option<&str>) -> Fault + Send + Sync + 'static,
    ) -> FaultProxy {
        etcd_backupd::targets::webdav::install_crypto_provider();
        // A small receive buffer, so that what the client has sent is close to what this
        // server has read: the slow-reader fault then really slows the sender.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let plan: Plan = Arc::new(plan);
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
    upstream: String,
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
            let out = format!(
                "HTTP/1.1 {code} Fault\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
            sock.write_all(out.as_bytes()).await?;
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
