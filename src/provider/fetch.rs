//! Fetching image URLs the provider hands back, without being turned against our network.
//!
//! An image URL comes from the provider's answer, which we do not control: followed
//! blindly it could make this service read a cloud metadata endpoint, a database on
//! loopback or anything else on a private network (SSRF). So the client that fetches image
//! URLs refuses private, loopback, link-local and other non-public addresses on every
//! hop — names through a resolver that filters what DNS returns, literal addresses before
//! the first request and in the redirect policy — follows a few redirects but never from
//! `https` down to `http`, and sends no `Referer`, which would leak a signed URL to the next
//! host. It is a separate client from the API's, which never sends the key here.
//!
//! `STAGE3_TEST_ALLOW_LOOPBACK_IMAGE_URLS=1` lets loopback through, for tests whose
//! stand-in serves images on 127.0.0.1; nothing else is ever allowed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{redirect, Client, Url};

/// Redirects are not part of the API; a few are tolerated for image URLs behind a CDN.
const MAX_REDIRECTS: usize = 5;

/// Which addresses an image fetch may reach.
#[derive(Debug, Clone, Copy)]
pub(super) struct AddressPolicy {
    pub allow_loopback: bool,
}

impl AddressPolicy {
    /// Whether `ip` is a public address (or loopback, when allowed for tests).
    pub(crate) fn permits(self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if ip.is_loopback() {
            return self.allow_loopback;
        }
        match ip {
            IpAddr::V4(v4) => is_public_v4(v4),
            IpAddr::V6(v6) => is_public_v6(v6),
        }
    }

    /// Checks a URL's host when it is a literal address (names go through the resolver).
    pub(crate) fn check_url(self, url: &Url) -> Result<(), String> {
        let literal = url
            .host_str()
            .map(|host| host.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|host| host.parse::<IpAddr>().ok());
        match literal {
            Some(ip) if !self.permits(ip) => Err(format!(
                "refusing to fetch an image from a non-public address ({ip})"
            )),
            _ => Ok(()),
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        // Carrier-grade NAT 100.64.0.0/10, benchmarking 198.18.0.0/15, reserved 240/4.
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // Unique local fc00::/7, link-local fe80::/10, site-local fec0::/10.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || (first & 0xffc0) == 0xfec0
        // Documentation 2001:db8::/32.
        || (first == 0x2001 && ip.segments()[1] == 0x0db8))
}

/// Resolves names as the system does, then keeps only the addresses the policy permits.
struct FilteringResolver {
    policy: AddressPolicy,
}

impl Resolve for FilteringResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let lookup = host.clone();
            let found: Vec<SocketAddr> = tokio::task::spawn_blocking(move || {
                std::net::ToSocketAddrs::to_socket_addrs(&(lookup.as_str(), 0))
                    .map(Iterator::collect::<Vec<_>>)
            })
            .await??;
            let permitted: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| policy.permits(addr.ip()))
                .collect();
            if permitted.is_empty() {
                return Err(format!(
                    "{host} resolves only to non-public addresses; image fetches are refused there"
                )
                .into());
            }
            let addrs: Addrs = Box::new(permitted.into_iter());
            Ok(addrs)
        })
    }
}

/// The client for image URLs: filtered addresses, checked redirects, no `Referer`.
pub(super) fn image_client(
    policy: AddressPolicy,
    connect_timeout: Duration,
) -> reqwest::Result<Client> {
    Client::builder()
        .tls_backend_rustls()
        .connect_timeout(connect_timeout)
        .user_agent(concat!("stage3/", env!("CARGO_PKG_VERSION")))
        .referer(false)
        .dns_resolver(Arc::new(FilteringResolver { policy }))
        .redirect(redirect::Policy::custom(move |attempt| {
            checked_redirect(attempt, policy)
        }))
        .build()
}

/// Follows a few redirects, but never from `https` down to `http` nor to a non-public
/// literal address.
fn checked_redirect(attempt: redirect::Attempt<'_>, policy: AddressPolicy) -> redirect::Action {
    let downgrade = attempt.url().scheme() == "http"
        && attempt
            .previous()
            .iter()
            .any(|previous| previous.scheme() == "https");
    if downgrade {
        attempt.error("refusing a redirect from https to http")
    } else if attempt.previous().len() > MAX_REDIRECTS {
        attempt.error("too many redirects")
    } else if let Err(why) = policy.check_url(attempt.url()) {
        attempt.error(why)
    } else {
        attempt.follow()
    }
}

/// Follows no redirect at all: the API answers directly, and a redirect could carry the
/// key's request elsewhere.
pub(super) fn api_redirects() -> redirect::Policy {
    redirect::Policy::none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses_are_refused() {
        let strict = AddressPolicy {
            allow_loopback: false,
        };
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!strict.permits(bad.parse().unwrap()), "{bad}");
        }
        for good in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"] {
            assert!(strict.permits(good.parse().unwrap()), "{good}");
        }
        let tests = AddressPolicy {
            allow_loopback: true,
        };
        assert!(tests.permits("127.0.0.1".parse().unwrap()));
        assert!(!tests.permits("169.254.169.254".parse().unwrap()));
        assert!(strict
            .check_url(&Url::parse("https://169.254.169.254/latest").unwrap())
            .is_err());
        assert!(strict
            .check_url(&Url::parse("https://cdn.example.com/x.png").unwrap())
            .is_ok());
    }
}
