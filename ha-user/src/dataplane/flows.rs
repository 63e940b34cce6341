//! The connection and reverse NAT tables' entries, and the flows API keyed
//! by backend address.
//!
//! The data path names a flow's backend by id: an index into the backend
//! table that this host's agent hands out, in the order it first saw each
//! backend. Another LB host numbers the same backends differently, so an id
//! means nothing outside this host. What the data plane says about flows to
//! the rest of the agent is therefore keyed by addresses and ports:
//! [`DataPlane::flow_views`] lists every flow as a [`FlowView`] (client,
//! VIP, backend, NAT source, state), and [`DataPlane::flows_by_backend`]
//! counts them per backend `address:port`. This is the seam that flow sync
//! between LB hosts (a future issue) is to use. The raw entries
//! ([`DataPlane::flows`], [`DataPlane::reverse_entries`]), which name
//! backends by id, are for the sweep, migration and tests.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
};

use aya::maps::HashMap as BpfHashMap;
use ha_common::{
    CONNTRACK_MAP, FLOW_LOCAL, Flow, FlowKey, FlowState, NatEntry, NatKey, REVERSE_NAT_MAP,
    addr_from_wire, port_from_wire,
};

use super::{DataPlane, Result, map_error};

/// One flow of the connection table, named by addresses and ports only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowView {
    /// The client's address and port, as it sent the flow.
    pub client: SocketAddrV4,
    /// The VIP and port the client sent it to.
    pub vip: SocketAddrV4,
    /// The IP protocol (`ha_common::PROTO_TCP` or `PROTO_UDP`).
    pub protocol: u8,
    /// The backend the flow goes to for its whole life; `None` when the id
    /// the entry names has no backend (a damaged table: a backend is freed
    /// only once no flow names it).
    pub backend: Option<SocketAddrV4>,
    /// The LB's address and port towards the backend; `None` for a flow to a
    /// backend on this host, which is passed up, not NATed.
    pub nat_source: Option<SocketAddrV4>,
    pub state: FlowState,
    /// The data path's clock ([`super::monotonic_coarse_ns`]) at the flow's
    /// last packet, refreshed at most every
    /// [`ha_common::LAST_SEEN_GRANULARITY_NS`] unless its state changed.
    pub last_seen_ns: u64,
}

/// How many flows of the connection table go to one backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCount {
    /// Every entry, whatever its state (ended ones the sweep has not removed
    /// yet included).
    pub flows: usize,
    /// Of them, the established ones (answered and confirmed, no FIN yet).
    pub established: usize,
}

fn socket(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr_from_wire(addr)), port_from_wire(port))
}

/// The connection table's entries named by addresses: `backends` gives each
/// backend id's `address:port`. In the table's order.
fn view_flows(flows: &[(FlowKey, Flow)], backends: &HashMap<u32, SocketAddrV4>) -> Vec<FlowView> {
    flows
        .iter()
        .map(|(key, flow)| FlowView {
            client: socket(key.src_addr, key.src_port),
            vip: socket(key.dst_addr, key.dst_port),
            protocol: key.protocol,
            backend: backends.get(&flow.backend_id).copied(),
            nat_source: (flow.flags & FLOW_LOCAL == 0)
                .then(|| socket(flow.nat_addr, flow.nat_port)),
            state: flow.state(),
            last_seen_ns: flow.last_seen_ns,
        })
        .collect()
}

/// Flows per backend `address:port` (flows without a known backend are
/// left out).
fn count_by_backend(views: &[FlowView]) -> BTreeMap<SocketAddrV4, FlowCount> {
    let mut counts: BTreeMap<SocketAddrV4, FlowCount> = BTreeMap::new();
    for view in views {
        if let Some(backend) = view.backend {
            let count = counts.entry(backend).or_default();
            count.flows += 1;
            count.established += usize::from(view.state == FlowState::Established);
        }
    }
    counts
}

impl DataPlane {
    /// The entries of the connection table, in one batched walk (for the
    /// sweep, status and tests; not a hot path).
    ///
    /// # Errors
    /// [`DataPlaneError::Dump`](super::DataPlaneError::Dump): the walk failed; no partial table is returned.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        self.dump(CONNTRACK_MAP)
    }

    /// The entries of the reverse NAT table, as [`DataPlane::flows`].
    ///
    /// # Errors
    /// As [`DataPlane::flows`].
    pub fn reverse_entries(&self) -> Result<Vec<(NatKey, NatEntry)>> {
        self.dump(REVERSE_NAT_MAP)
    }

    /// Inserts or replaces a connection-table entry (migration, tests).
    pub fn insert_flow(&mut self, key: &FlowKey, flow: &Flow) -> Result<()> {
        let mut table: BpfHashMap<_, FlowKey, Flow> = self.map_mut(CONNTRACK_MAP)?;
        table.insert(key, flow, 0).map_err(map_error(CONNTRACK_MAP))
    }

    /// Inserts or replaces a reverse NAT entry (migration; tests: occupy a port).
    pub fn insert_reverse_entry(&mut self, key: &NatKey, entry: &NatEntry) -> Result<()> {
        let mut table: BpfHashMap<_, NatKey, NatEntry> = self.map_mut(REVERSE_NAT_MAP)?;
        table
            .insert(key, entry, 0)
            .map_err(map_error(REVERSE_NAT_MAP))
    }

    /// Removes a reverse NAT entry (migration: a pickup's port; tests: one half of a flow lost).
    pub fn remove_reverse_entry(&mut self, key: &NatKey) -> Result<()> {
        let mut table: BpfHashMap<_, NatKey, NatEntry> = self.map_mut(REVERSE_NAT_MAP)?;
        table.remove(key).map_err(map_error(REVERSE_NAT_MAP))
    }

    /// Addresses of every backend that still has a record: configured ones,
    /// and retired ones that flows may still name (freed by the sweep).
    pub fn backend_addresses(&self) -> BTreeSet<IpAddr> {
        self.backend_ids
            .keys()
            .map(|(address, _)| IpAddr::V4(*address))
            .collect()
    }

    /// Every flow of the connection table, named by addresses (the module
    /// doc says why), in one batched walk as [`DataPlane::flows`].
    ///
    /// # Errors
    /// As [`DataPlane::flows`].
    pub fn flow_views(&self) -> Result<Vec<FlowView>> {
        Ok(view_flows(&self.flows()?, &self.backends_by_id()))
    }

    /// How many flows each backend has, by its `address:port`.
    ///
    /// # Errors
    /// As [`DataPlane::flows`].
    pub fn flows_by_backend(&self) -> Result<BTreeMap<SocketAddrV4, FlowCount>> {
        Ok(count_by_backend(&self.flow_views()?))
    }

    /// Every backend with a record (configured, or retired while flows may
    /// name it), by id.
    fn backends_by_id(&self) -> HashMap<u32, SocketAddrV4> {
        self.backend_ids
            .iter()
            .map(|((address, port), id)| (*id, SocketAddrV4::new(*address, *port)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::{
        FLOW_ASSURED, FLOW_FIN_CLIENT, FLOW_SEEN_REPLY, PROTO_TCP, PROTO_UDP, addr_to_wire,
        port_to_wire,
    };

    fn key(client_port: u16, protocol: u8) -> FlowKey {
        FlowKey {
            src_addr: addr_to_wire([10, 0, 0, 50]),
            dst_addr: addr_to_wire([10, 0, 0, 254]),
            src_port: port_to_wire(client_port),
            dst_port: port_to_wire(6443),
            protocol,
            _pad: [0; 3],
        }
    }

    fn flow(backend_id: u32, flags: u32, nat_port: u16) -> Flow {
        Flow {
            backend_id,
            flags,
            last_seen_ns: 7,
            nat_addr: addr_to_wire([10, 0, 0, 2]),
            nat_port: port_to_wire(nat_port),
            ..Flow::default()
        }
    }

    #[test]
    fn flows_are_named_and_counted_by_backend_address_not_by_host_local_id() {
        let established = FLOW_SEEN_REPLY | FLOW_ASSURED;
        let api1: SocketAddrV4 = "10.0.0.11:6443".parse().unwrap();
        let api2: SocketAddrV4 = "10.0.0.12:6443".parse().unwrap();
        let local: SocketAddrV4 = "10.0.0.2:6443".parse().unwrap();
        let flows = [
            (key(40001, PROTO_TCP), flow(3, established, 20001)),
            (key(40002, PROTO_TCP), flow(3, 0, 20002)),
            (
                key(40003, PROTO_TCP),
                flow(0, established | FLOW_FIN_CLIENT, 20003),
            ),
            (key(40004, PROTO_UDP), flow(7, FLOW_LOCAL | established, 0)),
            // An id without a backend record.
            (key(40005, PROTO_TCP), flow(9, established, 20005)),
        ];
        // Another host could have numbered them otherwise: only the ids differ.
        for ids in [[3, 0, 7], [0, 3, 7], [5, 1, 2]] {
            let renumbered: Vec<(FlowKey, Flow)> = flows
                .iter()
                .map(|(k, f)| {
                    let id = match f.backend_id {
                        3 => ids[0],
                        0 => ids[1],
                        7 => ids[2],
                        other => other + 100,
                    };
                    (
                        *k,
                        Flow {
                            backend_id: id,
                            ..*f
                        },
                    )
                })
                .collect();
            let backends = HashMap::from([(ids[0], api1), (ids[1], api2), (ids[2], local)]);
            let views = view_flows(&renumbered, &backends);
            assert_eq!(
                views[0],
                FlowView {
                    client: "10.0.0.50:40001".parse().unwrap(),
                    vip: "10.0.0.254:6443".parse().unwrap(),
                    protocol: PROTO_TCP,
                    backend: Some(api1),
                    nat_source: Some("10.0.0.2:20001".parse().unwrap()),
                    state: FlowState::Established,
                    last_seen_ns: 7,
                }
            );
            assert_eq!(views[1].state, FlowState::New);
            assert_eq!(views[2].state, FlowState::Closing);
            assert_eq!(views[3].nat_source, None, "a local flow is not NATed");
            assert_eq!(views[3].protocol, PROTO_UDP);
            assert_eq!(views[4].backend, None);
            assert_eq!(
                count_by_backend(&views),
                BTreeMap::from([
                    (
                        api1,
                        FlowCount {
                            flows: 2,
                            established: 1
                        }
                    ),
                    (
                        api2,
                        FlowCount {
                            flows: 1,
                            established: 0
                        }
                    ),
                    (
                        local,
                        FlowCount {
                            flows: 1,
                            established: 1
                        }
                    ),
                ])
            );
        }
    }
}
