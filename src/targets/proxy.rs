//! Which proxy a target uses. Resolved once per target (a target is one host), so that
//! `check-config --connect` can show the choice and the variable it came from, and reqwest
//! is handed an explicit proxy or none.
//!
//! The rules, for `proxy = "env"`: an `http://` URL uses `http_proxy`, then `HTTP_PROXY`; an
//! `https://` URL uses `https_proxy`, then `HTTPS_PROXY`; either falls back to `all_proxy`,
//! then `ALL_PROXY`. The lower-case form wins when both are set. Upper-case `HTTP_PROXY` is
//! honoured (curl ignores it, guarding CGI programs, where a request header can set it; a
//! daemon has no such exposure) because OpenShift's `/etc/mco/proxy.env`, which the unit
//! loads, sets only upper-case variables. `no_proxy`, then `NO_PROXY`, lists exceptions: `*`
//! alone for every host; host names matching themselves and any subdomain (a leading dot,
//! and a trailing dot on either side, are ignored); IP addresses and CIDR ranges matching
//! IP-literal hosts (no DNS lookup, as in curl). An entry with a port (`host:8443`) applies
//! to that port only. Exceptions come from that list alone: a loopback target goes through
//! the proxy unless the list names it (Go exempts loopback hosts by itself; this does not).

use std::net::IpAddr;

use url::Url;

use crate::config::ProxyMode;

/// The proxy decision for one target.
#[derive(Debug, Clone, PartialEq)]
pub enum ProxyChoice {
    Direct { why: String },
    Via { url: Url, why: String },
}

impl ProxyChoice {
    pub fn describe(&self) -> String {
        match self {
            ProxyChoice::Direct { why } => format!("direct ({why})"),
            // The URL's user name is shown, never a password (refused by the config anyway).
            ProxyChoice::Via { url, why } => format!("via {} ({why})", redact(url)),
        }
    }
}

fn redact(u: &Url) -> String {
    let mut u = u.clone();
    let _ = u.set_password(None);
    u.as_str().trim_end_matches('/').to_string()
}

/// Environment access, injectable for tests.
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.trim().is_empty())
    }
}

/// Resolves `mode` for `target`.
pub fn choose(mode: &ProxyMode, target: &Url, env: &dyn Env) -> Result<ProxyChoice, String> {
    match mode {
        ProxyMode::None => Ok(ProxyChoice::Direct {
            why: "proxy = \"none\"".into(),
        }),
        ProxyMode::Env => from_env(target, env),
        ProxyMode::Url(url, _) => Ok(ProxyChoice::Via {
            url: url.clone(),
            why: "this target's proxy setting".into(),
        }),
    }
}

fn from_env(target: &Url, env: &dyn Env) -> Result<ProxyChoice, String> {
    let host = target
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_ascii_lowercase();
    let port = target.port_or_known_default().unwrap_or(0);
    if let Some((var, list)) = ["no_proxy", "NO_PROXY"]
        .iter()
        .find_map(|k| env.var(k).map(|v| (*k, v)))
        && let Some(entry) = no_proxy_match(&list, &host, port)
    {
        return Ok(ProxyChoice::Direct {
            why: format!("{var} entry {entry:?} matches {host}"),
        });
    }
    let candidates: &[&str] = if target.scheme() == "https" {
        &["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
    } else {
        &["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
    };
    for var in candidates {
        if let Some(value) = env.var(var) {
            // curl takes a bare host:port as http://host:port.
            let with_scheme = if value.contains("://") {
                value.clone()
            } else {
                format!("http://{value}")
            };
            // The value may hold credentials: never echo it.
            let url = Url::parse(&with_scheme).map_err(|_| format!("{var}: not a proxy URL"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(format!("{var}: only http:// and https:// proxies are supported"));
            }
            return Ok(ProxyChoice::Via {
                url,
                why: format!("from {var}"),
            });
        }
    }
    Ok(ProxyChoice::Direct {
        why: "no proxy variable set".into(),
    })
}

/// The `no_proxy` entry that exempts `host` (on `port`), if any.
pub fn no_proxy_match(list: &str, host: &str, port: u16) -> Option<String> {
    if list.trim() == "*" {
        return Some("*".into());
    }
    let host = host.trim_end_matches('.');
    let host_ip: Option<IpAddr> = host.parse().ok();
    for raw in list.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()) {
        let entry = raw.to_ascii_lowercase();
        if let Some(ip) = host_ip {
            if let Some((net, bits)) = entry.split_once('/') {
                if let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u8>())
                    && in_cidr(ip, net, bits)
                {
                    return Some(raw.to_string());
                }
                continue;
            }
            let (addr, entry_port) = split_port(&entry);
            if addr.parse::<IpAddr>().ok() == Some(ip) && entry_port.is_none_or(|p| p == port) {
                return Some(raw.to_string());
            }
            continue;
        }
        let (name, entry_port) = split_port(&entry);
        let name = name.trim_start_matches('.').trim_end_matches('.');
        if !name.is_empty()
            && (host == name || host.ends_with(&format!(".{name}")))
            && entry_port.is_none_or(|p| p == port)
        {
            return Some(raw.to_string());
        }
    }
    None
}

/// `host:port`, `[v6]:port`, or a bare host/address (a bare IPv6 address has no port).
fn split_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((addr, tail)) => (addr, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (rest, None),
        };
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Fake(HashMap<&'static str, &'static str>);
    impl Env for Fake {
        fn var(&self, key: &str) -> Option<String> {
            self.0.get(key).map(|s| s.to_string())
        }
    }

    fn choose_with(vars: &[(&'static str, &'static str)], target: &str) -> ProxyChoice {
        choose(
            &ProxyMode::Env,
            &Url::parse(target).unwrap(),
            &Fake(vars.iter().cloned().collect()),
        )
        .unwrap()
    }

    #[test]
    fn no_proxy_rules_follow_curl() {
        let list = "localhost,.cluster.local,example.com.,10.0.0.0/16,fd00::/8,192.168.1.5,dav.internal:8443";
        let m = |h: &str| no_proxy_match(list, h, 443).is_some();
        assert!(m("localhost"));
        assert!(m("svc.cluster.local"));
        assert!(m("cluster.local"));
        assert!(m("dav.example.com"));
        assert!(m("dav.example.com."), "a trailing dot on the host is ignored");
        assert!(m("example.com"));
        assert!(!m("notexample.com"));
        assert!(m("10.0.200.7"));
        assert!(!m("10.1.0.1"));
        assert!(m("fd00::1"));
        assert!(m("192.168.1.5"));
        assert!(!m("192.168.1.6"));
        assert!(!m("dav.internal"), "the entry names another port");
        assert!(no_proxy_match(list, "dav.internal", 8443).is_some());
        assert!(no_proxy_match("*", "anything.example", 443).is_some());
        assert!(
            no_proxy_match("a.example,*", "other.example", 443).is_none(),
            "'*' counts only alone"
        );
        assert!(no_proxy_match("", "a", 443).is_none());
    }

    /// The variable that chose the route, as `check-config --connect` shows it.
    fn via(vars: &[(&'static str, &'static str)], target: &str) -> String {
        match choose_with(vars, target) {
            ProxyChoice::Via { url, why } => format!("{} {why}", redact(&url)),
            other => panic!("{target}: {other:?}"),
        }
    }

    #[test]
    fn variables_are_picked_per_scheme_lower_case_first() {
        // /etc/mco/proxy.env: upper case only.
        let mco = [
            ("HTTP_PROXY", "http://p:3128"),
            ("HTTPS_PROXY", "http://ps:3129"),
            ("NO_PROXY", ".cluster.local,.svc,localhost,127.0.0.1,10.0.0.0/16"),
        ];
        assert_eq!(via(&mco, "http://dav.example.com/"), "http://p:3128 from HTTP_PROXY");
        assert_eq!(via(&mco, "https://dav.example.com/"), "http://ps:3129 from HTTPS_PROXY");
        for exempt in ["http://127.0.0.1:8080/", "https://dav.svc/", "http://10.0.3.4/"] {
            match choose_with(&mco, exempt) {
                ProxyChoice::Direct { why } => assert!(why.starts_with("NO_PROXY entry"), "{why}"),
                other => panic!("{exempt}: {other:?}"),
            }
        }
        // The lower-case form wins when both are set, for each scheme and for no_proxy.
        let both = [
            ("http_proxy", "http://lower:1"),
            ("HTTP_PROXY", "http://upper:2"),
            ("https_proxy", "http://lower-s:3"),
            ("HTTPS_PROXY", "http://upper-s:4"),
            ("no_proxy", "a.example"),
            ("NO_PROXY", "b.example"),
        ];
        assert_eq!(via(&both, "http://x/"), "http://lower:1 from http_proxy");
        assert_eq!(via(&both, "https://x/"), "http://lower-s:3 from https_proxy");
        assert!(matches!(
            choose_with(&both, "http://a.example/"),
            ProxyChoice::Direct { .. }
        ));
        assert_eq!(via(&both, "http://b.example/"), "http://lower:1 from http_proxy");
        // Each scheme reads only its own variables, then all_proxy.
        assert!(matches!(
            choose_with(&[("HTTPS_PROXY", "http://ps:1")], "http://x/"),
            ProxyChoice::Direct { .. }
        ));
        assert!(matches!(
            choose_with(&[("HTTP_PROXY", "http://p:1")], "https://x/"),
            ProxyChoice::Direct { .. }
        ));
        let all = [("HTTP_PROXY", "http://p:1"), ("all_proxy", "http://all:2")];
        assert_eq!(via(&all, "https://x/"), "http://all:2 from all_proxy");
        assert_eq!(via(&all, "http://x/"), "http://p:1 from HTTP_PROXY");
        // Loopback is proxied unless NO_PROXY names it (unlike Go).
        assert_eq!(
            via(&[("HTTP_PROXY", "http://p:3128")], "http://127.0.0.1:8080/"),
            "http://p:3128 from HTTP_PROXY"
        );
        assert_eq!(
            via(&[("HTTP_PROXY", "http://p:3128")], "http://localhost/"),
            "http://p:3128 from HTTP_PROXY"
        );
        let shown = choose_with(&[("HTTP_PROXY", "http://127.0.0.1:3128")], "http://dav/").describe();
        assert_eq!(shown, "via http://127.0.0.1:3128 (from HTTP_PROXY)");
    }

    #[test]
    fn variables_are_parsed_and_never_shown() {
        let v = [
            ("HTTPS_PROXY", "http://p:3128"),
            ("HTTP_PROXY", "http://upper:1"),
            ("no_proxy", ".internal"),
        ];
        assert!(
            matches!(choose_with(&v, "https://dav.example.com/"), ProxyChoice::Via { url, .. } if url.port() == Some(3128))
        );
        assert!(matches!(
            choose_with(&v, "https://dav.internal/"),
            ProxyChoice::Direct { .. }
        ));
        let v = [("https_proxy", "p2:8080"), ("HTTPS_PROXY", "http://ignored:1")];
        match choose_with(&v, "https://x/") {
            ProxyChoice::Via { url, why } => {
                assert_eq!(url.as_str(), "http://p2:8080/");
                assert_eq!(why, "from https_proxy");
            }
            other => panic!("{other:?}"),
        }
        let v = [("ALL_PROXY", "http://all:1")];
        assert!(matches!(choose_with(&v, "http://x/"), ProxyChoice::Via { .. }));
        let v = [("HTTPS_PROXY", "socks5://p:1080")];
        assert!(
            choose(
                &ProxyMode::Env,
                &Url::parse("https://x/").unwrap(),
                &Fake(v.into_iter().collect())
            )
            .is_err()
        );
        // Credentials in the variable are used, and never shown.
        let v = [("HTTPS_PROXY", "http://u:s3cret@p:3128")];
        let c = choose_with(&v, "https://x/");
        assert!(!c.describe().contains("s3cret"), "{}", c.describe());
        let none = choose(
            &ProxyMode::None,
            &Url::parse("https://x/").unwrap(),
            &Fake([("HTTPS_PROXY", "http://p:1")].into()),
        )
        .unwrap();
        assert!(matches!(none, ProxyChoice::Direct { .. }));
    }
}
