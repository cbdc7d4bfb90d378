//! The client's address as failed-login throttling sees it. Behind an ingress every connection
//! comes from the proxy, so the address is read from `X-Forwarded-For` — but only the hops the
//! operator lists as trusted proxies may speak for the client: anyone else could write any address
//! there and spread failures over made-up clients.

use std::net::IpAddr;

/// Networks whose connections may name the client in `X-Forwarded-For`
/// (`[gateway] trusted_proxies`, e.g. `["10.0.0.0/8", "127.0.0.1"]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

/// An entry of `trusted_proxies` that is not an address or a CIDR network.
#[derive(Debug, thiserror::Error)]
#[error("trusted_proxies: {0:?} is not an IP address or CIDR network (e.g. 10.0.0.0/8)")]
pub struct InvalidNetwork(pub String);

impl TrustedProxies {
    pub fn parse<S: AsRef<str>>(networks: &[S]) -> Result<Self, InvalidNetwork> {
        let parse = |text: &str| {
            let invalid = || InvalidNetwork(text.to_owned());
            let (addr, bits) = match text.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (text, None),
            };
            let addr: IpAddr = addr.trim().parse().map_err(|_| invalid())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                Some(bits) => bits.trim().parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(invalid)?,
                None => max,
            };
            Ok((addr, bits))
        };
        networks.iter().map(|n| parse(n.as_ref())).collect::<Result<_, _>>().map(Self)
    }

    fn trusts(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|&(network, bits)| contains(network, bits, addr))
    }

    /// The client behind `peer`: `peer` itself unless it is a trusted proxy, else the nearest
    /// `X-Forwarded-For` hop that is not one (the last trusted hop when the header ends first or
    /// holds something that is not an address).
    pub fn client(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for hop in forwarded_for.unwrap_or_default().rsplit(',') {
            let Ok(addr) = hop.trim().parse::<IpAddr>() else { break };
            client = addr;
            if !self.trusts(addr) {
                break;
            }
        }
        client
    }
}

fn contains(network: IpAddr, bits: u8, addr: IpAddr) -> bool {
    match (network, addr) {
        (IpAddr::V4(network), IpAddr::V4(addr)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(network) & mask == u32::from(addr) & mask
        }
        (IpAddr::V6(network), IpAddr::V6(addr)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(network) & mask == u128::from(addr) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn only_trusted_proxies_speak_for_the_client() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8", "::1"]).unwrap();
        assert_eq!(proxies.client(ip("203.0.113.9"), Some("1.2.3.4")), ip("203.0.113.9"), "an untrusted peer");
        assert_eq!(proxies.client(ip("10.1.2.3"), Some("1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(proxies.client(ip("10.1.2.3"), Some("6.6.6.6, 1.2.3.4, 10.9.9.9")), ip("1.2.3.4"), "nearest hop");
        assert_eq!(proxies.client(ip("10.1.2.3"), None), ip("10.1.2.3"));
        assert_eq!(proxies.client(ip("10.1.2.3"), Some("garbage, 10.2.2.2")), ip("10.2.2.2"));
        assert_eq!(proxies.client(ip("::1"), Some("2001:db8::7")), ip("2001:db8::7"));
        assert_eq!(TrustedProxies::default().client(ip("10.1.2.3"), Some("1.2.3.4")), ip("10.1.2.3"));
    }

    #[test]
    fn networks_are_validated() {
        assert!(TrustedProxies::parse(&["0.0.0.0/0"]).unwrap().trusts(ip("8.8.8.8")));
        assert!(!TrustedProxies::parse(&["192.168.1.0/24"]).unwrap().trusts(ip("192.168.2.1")));
        assert!(!TrustedProxies::parse(&["10.0.0.0/8"]).unwrap().trusts(ip("::ffff:10.0.0.1")));
        for bad in ["10.0.0.0/33", "nonsense", "::/129", ""] {
            assert!(TrustedProxies::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
