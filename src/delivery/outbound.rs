//! Outbound URL safety: a subscription must not turn the worker against the network it runs in.
//!
//! By default only `https` URLs whose host is a public (globally routable) address are allowed.
//! The check runs twice: statically on the URL (at dispatch and before each request: IP-literal hosts
//! never reach a resolver), and at connect time in the HTTP client's DNS resolver, which refuses a name
//! if any of its addresses is not public and hands the client exactly the addresses it checked (so a
//! second, different DNS answer cannot slip in). Redirects are not followed and proxies are not used.
//! With `allow_unsafe_outbound` (tests, the demo), `http` and private hosts are allowed; other schemes
//! never are.
//!
//! URL parsing follows the WHATWG URL standard, so decimal (`2130706433`), octal (`0177.0.0.1`) and hex
//! (`0x7f.1`) IPv4 forms are normalised to the address they mean before they are checked.

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Why an endpoint is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafeUrl {
    /// Not an absolute URL.
    #[error("endpoint is not a valid absolute URL: {0}")]
    Invalid(String),
    /// A scheme other than https (or http when unsafe targets are allowed).
    #[error("endpoint scheme `{0}` is not allowed (https only)")]
    Scheme(String),
    /// No host.
    #[error("endpoint has no host")]
    NoHost,
    /// `localhost` and its kin.
    #[error("endpoint host `{0}` is a local name")]
    LocalName(String),
    /// A literal or resolved address that is not public.
    #[error("endpoint address {0} is not a public address ({1})")]
    Address(IpAddr, &'static str),
    /// Credentials in the URL would be sent to the receiver and logged by proxies: refused.
    #[error("endpoint URL must not contain a user name or password (use channel.header)")]
    Credentials,
}

/// Checks an endpoint URL without DNS. Returns the parsed URL.
pub fn check_url(endpoint: &str, allow_unsafe: bool) -> Result<Url, UnsafeUrl> {
    let url = Url::parse(endpoint.trim()).map_err(|error| UnsafeUrl::Invalid(error.to_string()))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_unsafe => {}
        other => return Err(UnsafeUrl::Scheme(other.to_owned())),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UnsafeUrl::Credentials);
    }
    let host = url.host().ok_or(UnsafeUrl::NoHost)?;
    if allow_unsafe {
        return Ok(url);
    }
    match host {
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name == "localhost"
                || name == "localhost.localdomain"
                || name.ends_with(".localhost")
            {
                return Err(UnsafeUrl::LocalName(name));
            }
        }
        url::Host::Ipv4(ip) => check_ip(IpAddr::V4(ip))?,
        url::Host::Ipv6(ip) => check_ip(IpAddr::V6(ip))?,
    }
    Ok(url)
}

/// Refuses an address that is not globally routable, naming the range it is in.
pub fn check_ip(ip: IpAddr) -> Result<(), UnsafeUrl> {
    match non_public_range(ip) {
        Some(range) => Err(UnsafeUrl::Address(ip, range)),
        None => Ok(()),
    }
}

fn non_public_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, ..) => "0.0.0.0/8 this network",
        (10, ..) => "10.0.0.0/8 private",
        (100, 64..=127, _) => "100.64.0.0/10 shared address space",
        (127, ..) => "127.0.0.0/8 loopback",
        (169, 254, _) => "169.254.0.0/16 link-local (cloud metadata)",
        (172, 16..=31, _) => "172.16.0.0/12 private",
        (192, 0, 0) => "192.0.0.0/24 IETF protocol assignments",
        (192, 0, 2) => "192.0.2.0/24 documentation",
        (192, 88, 99) => "192.88.99.0/24 6to4 relay anycast",
        (192, 168, _) => "192.168.0.0/16 private",
        (198, 18..=19, _) => "198.18.0.0/15 benchmarking",
        (198, 51, 100) => "198.51.100.0/24 documentation",
        (203, 0, 113) => "203.0.113.0/24 documentation",
        (224..=239, ..) => "224.0.0.0/4 multicast",
        (240..=255, ..) => "240.0.0.0/4 reserved or broadcast",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    // Addresses that carry an IPv4 address are as safe as that address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4).map(|_| "IPv4-mapped IPv6 of a non-public IPv4 address");
    }
    let embedded = |high: u16, low: u16| Ipv4Addr::from(((u32::from(high)) << 16) | u32::from(low));
    if segments[0] == 0x64 && segments[1] == 0xff9b && segments[2..6] == [0, 0, 0, 0] {
        return non_public_v4(embedded(segments[6], segments[7]))
            .map(|_| "NAT64 64:ff9b::/96 of a non-public IPv4 address");
    }
    if segments[0] == 0x2002 {
        return non_public_v4(embedded(segments[1], segments[2]))
            .map(|_| "6to4 2002::/16 of a non-public IPv4 address");
    }
    Some(match segments[0] {
        0 if ip.is_loopback() => "::1 loopback",
        0 if ip.is_unspecified() => ":: unspecified",
        0 => "::/8 reserved (IPv4-compatible and others)",
        0x0064 if segments[1] == 0xff9b && segments[2] == 1 => "64:ff9b:1::/48 local NAT64",
        0x0100 if segments[1..4] == [0, 0, 0] => "100::/64 discard",
        0x2001 if segments[1] == 0 => "2001::/32 Teredo",
        0x2001 if segments[1] == 0x0db8 => "2001:db8::/32 documentation",
        0x2001 if segments[1] < 0x0200 => "2001::/23 IETF protocol assignments",
        0x2000..=0x3fff => return None,
        0xfc00..=0xfdff => "fc00::/7 unique local",
        0xfe80..=0xfebf => "fe80::/10 link-local",
        0xfec0..=0xfeff => "fec0::/10 site-local",
        0xff00..=0xffff => "ff00::/8 multicast",
        _ => "outside 2000::/3 global unicast",
    })
}

/// The HTTP client's resolver: resolves with the system resolver and refuses the name if any address
/// is not public (a name that resolves to both is a rebinding attempt as far as we are concerned).
#[derive(Debug, Default, Clone, Copy)]
pub struct PublicOnlyResolver;

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addresses.is_empty() {
                return Err(format!("{host} has no addresses").into());
            }
            for address in &addresses {
                if let Some(range) = non_public_range(address.ip()) {
                    return Err(format!(
                        "{host} resolves to {} which is not a public address ({range})",
                        address.ip()
                    )
                    .into());
                }
            }
            let addresses: Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

/// The HTTP client deliveries use: no redirects, no proxies, public addresses only unless allowed.
pub fn client(
    allow_unsafe: bool,
    connect_timeout: std::time::Duration,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .user_agent(concat!("fhir-outbox/", env!("CARGO_PKG_VERSION")));
    let builder = if allow_unsafe {
        builder
    } else {
        builder
            .https_only(true)
            .dns_resolver(Arc::new(PublicOnlyResolver))
    };
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_private_loopback_link_local_and_odd_forms_by_default() {
        let refused = [
            "http://example.org/hook",
            "ftp://example.org/",
            "file:///etc/passwd",
            "https://localhost/",
            "https://LOCALHOST./",
            "https://api.localhost/",
            "https://localhost.localdomain/",
            "https://127.0.0.1/",
            "https://127.1/",
            "https://2130706433/",
            "https://0x7f000001/",
            "https://0177.0.0.1/",
            "https://0x7f.1/",
            "https://10.0.0.1/",
            "https://172.16.5.4/",
            "https://192.168.1.1/",
            "https://169.254.169.254/latest/meta-data/",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://198.18.0.1/",
            "https://224.0.0.1/",
            "https://255.255.255.255/",
            "https://[::1]/",
            "https://[::]/",
            "https://[fc00::1]/",
            "https://[fd12:3456::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:169.254.169.254]/",
            "https://[64:ff9b::10.0.0.1]/",
            "https://[2002:c0a8:0101::1]/",
            "https://[ff02::1]/",
            "https://[2001:db8::1]/",
            "https://user:pass@example.org/",
            "not a url",
        ];
        for url in refused {
            assert!(check_url(url, false).is_err(), "{url} must be refused");
        }
        assert_eq!(refused.len(), 35);
    }

    #[test]
    fn allows_public_https_and_unsafe_when_configured() {
        for url in [
            "https://example.org/hook",
            "https://93.184.216.34/x",
            "https://[2606:2800:220:1:248:1893:25c8:1946]/",
            "https://[64:ff9b::5db8:d822]/",
            "https://[2002:5db8:d822::1]/",
        ] {
            assert!(check_url(url, false).is_ok(), "{url} must be allowed");
        }
        assert!(check_url("http://127.0.0.1:8080/hook", true).is_ok());
        assert!(check_url("https://localhost/", true).is_ok());
        assert!(matches!(
            check_url("file:///etc/passwd", true),
            Err(UnsafeUrl::Scheme(_))
        ));
        assert!(matches!(
            check_url("gopher://x/", true),
            Err(UnsafeUrl::Scheme(_))
        ));
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_that_resolve_to_private_addresses() {
        // `localhost` resolves (from /etc/hosts) to loopback: the connect-time check must refuse it,
        // whatever the static check said.
        let name: Name = "localhost".parse().unwrap();
        let error = match PublicOnlyResolver.resolve(name).await {
            Ok(_) => panic!("localhost must be refused"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains("not a public address"), "{error}");
    }

    #[test]
    fn error_names_the_range() {
        let error = check_url("https://169.254.169.254/", false).unwrap_err();
        assert!(error.to_string().contains("link-local"), "{error}");
    }
}
