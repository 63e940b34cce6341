//! What the agent changes in the host's network configuration, through
//! rtnetlink: the VIP address, and kernel-managed neighbour entries that keep
//! the backends' MAC addresses resolved for the data path.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
};

use futures::TryStreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressFlags, AddressMessage},
    link::LinkAttribute,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage,
        NeighbourState,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    #[error(
        "interface {0} has no IPv4 address to use as the NAT source (set data_plane.nat.source_address)"
    )]
    NoIpv4Address(String),
    /// VIP addresses (/32) and neighbour entries are IPv4 for now.
    #[error("{what}: {source}")]
    NotIpv4 {
        what: &'static str,
        #[source]
        source: crate::ip::NotIpv4,
    },
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

type Result<T> = std::result::Result<T, NetlinkError>;

/// A connection to the kernel's routing netlink, for the calling thread's
/// network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

/// The IPv4 edge: `address` for a request that is IPv4 only for now.
fn ipv4(what: &'static str, address: IpAddr) -> Result<Ipv4Addr> {
    crate::ip::ipv4(address).map_err(|source| NetlinkError::NotIpv4 { what, source })
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

/// What VRRP tracking reads off the attach interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkHealth {
    /// Administratively and operationally up (carrier included).
    pub up: bool,
    /// An XDP program is attached.
    pub xdp_attached: bool,
}

impl Netlink {
    /// Must be called inside a tokio runtime (it spawns the connection task).
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    pub async fn interface_index(&self, name: &str) -> Result<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) | Err(_) => Err(NetlinkError::NoSuchInterface(name.to_string())),
        }
    }

    async fn link(&self, ifindex: u32) -> Result<rtnetlink::packet_route::link::LinkMessage> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        links
            .try_next()
            .await
            .map_err(request(format!("reading interface {ifindex}")))?
            .ok_or_else(|| NetlinkError::NoSuchInterface(ifindex.to_string()))
    }

    /// The interface's MAC address (for gratuitous ARP).
    pub async fn interface_mac(&self, ifindex: u32) -> Result<[u8; 6]> {
        let link = self.link(ifindex).await?;
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(mac) if mac.len() == 6 => {
                    Some([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]])
                }
                _ => None,
            })
            .ok_or_else(|| {
                NetlinkError::NoSuchInterface(format!("{ifindex} (no Ethernet address)"))
            })
    }

    /// Whether the interface is up (operationally, carrier included) and has
    /// an XDP program attached: VRRP tracking goes to fault when either is not.
    pub async fn link_health(&self, ifindex: u32) -> Result<LinkHealth> {
        use rtnetlink::packet_route::link::{LinkFlags, LinkXdp, State, XdpAttached};
        let link = self.link(ifindex).await?;
        let admin_up = link.header.flags.contains(LinkFlags::Up);
        let oper_up = link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::OperState(State::Up | State::Unknown)));
        let xdp = link.attributes.iter().any(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp
                .iter()
                .any(|x| matches!(x, LinkXdp::Attached(mode) if *mode != XdpAttached::None)),
            _ => false,
        });
        Ok(LinkHealth {
            up: admin_up && oper_up,
            xdp_attached: xdp,
        })
    }

    /// The interface's link kind as rtnetlink names it (`veth`, `vlan`,
    /// `bond`, ...); `None` for a physical NIC, which has none.
    pub async fn link_kind(&self, ifindex: u32) -> Result<Option<String>> {
        use rtnetlink::packet_route::link::LinkInfo;
        let link = self.link(ifindex).await?;
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(kind) => Some(kind.to_string()),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// Every interface except loopback: where the data path may redirect to.
    pub async fn interface_indexes(&self) -> Result<Vec<u32>> {
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(request("listing interfaces"))?;
        Ok(links
            .into_iter()
            .filter(|link| {
                !link
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfName(name) if name == "lo"))
            })
            .map(|link| link.header.index)
            .collect())
    }

    async fn ipv4_addresses(
        &self,
        ifindex: Option<u32>,
    ) -> Result<Vec<(u32, Ipv4Addr, u8, AddressMessage)>> {
        let mut get = self.handle.address().get();
        if let Some(index) = ifindex {
            get = get.set_link_index_filter(index);
        }
        let messages: Vec<AddressMessage> = get
            .execute()
            .try_collect()
            .await
            .map_err(request("listing addresses"))?;
        Ok(messages
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .filter_map(|m| {
                let addr = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(v4)) => Some(*v4),
                    _ => None,
                })?;
                Some((m.header.index, addr, m.header.prefix_len, m))
            })
            .collect())
    }

    /// Every IPv4 address of this host (namespace).
    pub async fn local_addresses(&self) -> Result<HashSet<IpAddr>> {
        Ok(self
            .ipv4_addresses(None)
            .await?
            .into_iter()
            .map(|(_, a, _, _)| IpAddr::V4(a))
            .collect())
    }

    /// The interface's first IPv4 address that is not a /32 (a VIP is a /32).
    pub async fn primary_address(&self, iface: &str, ifindex: u32) -> Result<IpAddr> {
        self.ipv4_addresses(Some(ifindex))
            .await?
            .into_iter()
            .find(|(_, _, prefix, _)| *prefix < 32)
            .map(|(_, addr, _, _)| IpAddr::V4(addr))
            .ok_or_else(|| NetlinkError::NoIpv4Address(iface.to_string()))
    }

    /// Whether the interface has `address` (only IPv4 addresses are listed:
    /// an IPv6 one is never found).
    pub async fn has_address(&self, ifindex: u32, address: IpAddr) -> Result<bool> {
        Ok(self
            .ipv4_addresses(Some(ifindex))
            .await?
            .iter()
            .any(|(_, a, _, _)| IpAddr::V4(*a) == address))
    }

    /// Adds `address/32 noprefixroute`: the host answers for it (ARP, local
    /// delivery) without a route that would change how anything else is reached.
    pub async fn add_vip(&self, ifindex: u32, address: IpAddr) -> Result<()> {
        let address = ipv4("adding a VIP address", address)?;
        let mut add = self.handle.address().add(ifindex, IpAddr::V4(address), 32);
        add.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
        add.execute().await.map_err(request(format!(
            "adding {address}/32 to interface {ifindex}"
        )))
    }

    /// Sets how long `address/32` stays valid (`ip address change ...
    /// valid_lft N preferred_lft N`): `Some(seconds)` makes the kernel remove
    /// it then, `None` makes it permanent again. Adds it if it is missing.
    pub async fn set_vip_lifetime(
        &self,
        ifindex: u32,
        address: IpAddr,
        seconds: Option<u32>,
    ) -> Result<()> {
        let address = ipv4("setting a VIP address's lifetime", address)?;
        let forever = u32::MAX;
        let lifetime = seconds.unwrap_or(forever);
        let mut change = self
            .handle
            .address()
            .add(ifindex, IpAddr::V4(address), 32)
            .replace();
        let attributes = &mut change.message_mut().attributes;
        attributes.push(AddressAttribute::Flags(AddressFlags::Noprefixroute));
        let mut cache_info = rtnetlink::packet_route::address::CacheInfo::default();
        cache_info.ifa_preferred = lifetime;
        cache_info.ifa_valid = lifetime;
        attributes.push(AddressAttribute::CacheInfo(cache_info));
        change.execute().await.map_err(request(format!(
            "setting the lifetime of {address}/32 on interface {ifindex}"
        )))
    }

    pub async fn remove_vip(&self, ifindex: u32, address: IpAddr) -> Result<()> {
        let address = ipv4("removing a VIP address", address)?;
        for (_, addr, prefix, message) in self.ipv4_addresses(Some(ifindex)).await? {
            if addr == address && prefix == 32 {
                self.handle
                    .address()
                    .del(message)
                    .execute()
                    .await
                    .map_err(request(format!(
                        "removing {address}/32 from interface {ifindex}"
                    )))?;
            }
        }
        Ok(())
    }

    /// A kernel-managed neighbour entry (`ip neigh add ADDR dev IF managed
    /// extern_learn`): the kernel resolves it and keeps it fresh without
    /// traffic, so the XDP program's FIB lookups find the MAC.
    pub async fn add_managed_neighbour(&self, ifindex: u32, address: IpAddr) -> Result<()> {
        let address = ipv4("adding a neighbour entry", address)?;
        let mut add = self
            .handle
            .neighbours()
            .add(ifindex, IpAddr::V4(address))
            .state(NeighbourState::None)
            .flags(NeighbourFlags::ExtLearned)
            .replace();
        add.message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        add.execute().await.map_err(request(format!(
            "adding managed neighbour {address} on interface {ifindex}"
        )))
    }

    pub async fn remove_neighbour(&self, ifindex: u32, address: IpAddr) -> Result<()> {
        let address = ipv4("removing a neighbour entry", address)?;
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.ifindex = ifindex;
        message
            .attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                address,
            )));
        self.handle
            .neighbours()
            .del(message)
            .execute()
            .await
            .map_err(request(format!(
                "removing neighbour {address} on interface {ifindex}"
            )))
    }
}
