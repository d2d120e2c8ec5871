//! Generated protobuf types. `cim` is the client wire contract, cim-proto's `pb` re-exported
//! under its old path; `cim::cluster` holds the internal call bodies (`proto/cluster.proto`),
//! generated here because only the cluster's processes use them.

pub mod cim {
    pub use cim_proto::pb::*;

    #[allow(clippy::all, clippy::pedantic)]
    pub mod cluster {
        include!(concat!(env!("OUT_DIR"), "/cim.cluster.rs"));
        include!(concat!(env!("OUT_DIR"), "/cim.cluster.serde.rs"));
    }
}
