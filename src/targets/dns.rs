//! Host name resolution for remote targets (and their proxies). `getaddrinfo`, as the
//! standard library and reqwest's default resolver call it, but keeping its error code: a
//! name the resolver says does not exist fails the target at once, while a resolver that did
//! not answer (`EAI_AGAIN`) is worth retrying. The error is a type of its own, so that the
//! retry logic finds it in an error's source chain without reading message text.

use std::ffi::{CStr, CString};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// A failed lookup of `host`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot resolve host name '{host}': {detail}")]
pub struct ResolveError {
    pub host: String,
    /// The resolver's own words (`gai_strerror`).
    pub detail: String,
    /// Might asking again help: the resolver did not answer in time, or ran out of
    /// resources (`EAI_AGAIN`, `EAI_MEMORY`, `EAI_SYSTEM`)? Otherwise the name does not
    /// exist or has no address, and the next attempt gets the same answer.
    pub transient: bool,
}

/// The addresses of `host` (port 0: the caller sets it). Blocks; run it off the runtime.
pub fn lookup(host: &str) -> Result<Vec<SocketAddr>, ResolveError> {
    let fail = |detail: String, transient: bool| ResolveError {
        host: host.to_string(),
        detail,
        transient,
    };
    let c_host = CString::new(host).map_err(|_| fail("the name holds a NUL byte".into(), false))?;
    // SAFETY: an all-zero addrinfo is the documented "no hints" value; the fields set below
    // are plain integers.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid NUL-terminated host, null service, valid hints and out pointer.
    let rc = unsafe { libc::getaddrinfo(c_host.as_ptr(), std::ptr::null(), &hints, &mut res) };
    if rc != 0 {
        let detail = if rc == libc::EAI_SYSTEM {
            std::io::Error::last_os_error().to_string()
        } else {
            // SAFETY: gai_strerror returns a pointer to a static NUL-terminated string.
            unsafe { CStr::from_ptr(libc::gai_strerror(rc)) }
                .to_string_lossy()
                .into_owned()
        };
        let transient = rc == libc::EAI_AGAIN || rc == libc::EAI_MEMORY || rc == libc::EAI_SYSTEM;
        return Err(fail(detail, transient));
    }
    let mut addrs = Vec::new();
    let mut cur = res;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getaddrinfo returned, not freed yet; each
        // ai_addr points to ai_addrlen bytes of the sockaddr its family names.
        let ai = unsafe { &*cur };
        let len = ai.ai_addrlen as usize;
        match ai.ai_family {
            libc::AF_INET if !ai.ai_addr.is_null() && len >= size_of::<libc::sockaddr_in>() => {
                let sa = unsafe { &*(ai.ai_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
                addrs.push(SocketAddr::V4(SocketAddrV4::new(ip, 0)));
            }
            libc::AF_INET6 if !ai.ai_addr.is_null() && len >= size_of::<libc::sockaddr_in6>() => {
                let sa = unsafe { &*(ai.ai_addr as *const libc::sockaddr_in6) };
                let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
                addrs.push(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    0,
                    sa.sin6_flowinfo,
                    sa.sin6_scope_id,
                )));
            }
            _ => {}
        }
        cur = ai.ai_next;
    }
    // SAFETY: `res` came from a successful getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(res) };
    if addrs.is_empty() {
        return Err(fail("no IPv4 or IPv6 address".into(), false));
    }
    Ok(addrs)
}

/// The resolver handed to reqwest.
pub struct Resolver;

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = tokio::task::spawn_blocking(move || lookup(&host)).await??;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_or_fail_for_good() {
        // `localhost` comes from /etc/hosts, which a bare chroot (debootstrap minbase) lacks.
        let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        if hosts.split_whitespace().any(|w| w == "localhost") {
            let addrs = lookup("localhost").unwrap();
            assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        }
        assert_eq!(lookup("127.0.0.1").unwrap()[0].ip().to_string(), "127.0.0.1");
        // RFC 6761: .invalid never resolves: for good, unless this machine's resolver does
        // not answer at all (EAI_AGAIN, then worth a retry).
        let e = lookup("no-such-host.invalid").unwrap_err();
        assert_eq!(e.host, "no-such-host.invalid");
        assert!(
            e.to_string()
                .starts_with("cannot resolve host name 'no-such-host.invalid': "),
            "{e}"
        );
        assert!(!e.transient || e.detail.contains("Temporary failure"), "{e:?}");
        assert!(!lookup("a\0b").unwrap_err().transient);
    }
}
