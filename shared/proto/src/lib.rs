//! Generated protobuf types and tonic clients/servers for every meshgate contract.

/// Types shared by every contract.
pub mod common {
    pub mod v1 {
        tonic::include_proto!("meshgate.common.v1");

        impl Layer {
            /// Short name used in headers, metrics labels, reasons and analytics ("l0".."l3";
            /// empty when unspecified).
            pub fn short_name(self) -> &'static str {
                match self {
                    Layer::L0Local => "l0",
                    Layer::L1Cheap => "l1",
                    Layer::L2Standard => "l2",
                    Layer::L3Premium => "l3",
                    Layer::Unspecified => "",
                }
            }

            /// [`Layer::short_name`] of a raw enum value (empty when it names no layer).
            pub fn short_name_of(value: i32) -> &'static str {
                Layer::try_from(value).unwrap_or(Layer::Unspecified).short_name()
            }
        }
    }
}

/// The edge's gRPC facade.
pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("meshgate.gateway.v1");
    }
}

/// Local model execution.
pub mod inference {
    pub mod v1 {
        tonic::include_proto!("meshgate.inference.v1");
    }
}

/// Routing decisions.
pub mod router {
    pub mod v1 {
        tonic::include_proto!("meshgate.router.v1");
    }
}

/// Budgets and rate limits.
pub mod quota {
    pub mod v1 {
        tonic::include_proto!("meshgate.quota.v1");
    }
}

/// Traces and analytics.
pub mod analytics {
    pub mod v1 {
        tonic::include_proto!("meshgate.analytics.v1");
    }
}

/// Upstream providers and the durable queue.
pub mod sync {
    pub mod v1 {
        tonic::include_proto!("meshgate.sync.v1");
    }
}

/// Encoded `FileDescriptorSet` of every contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("meshgate_descriptor");
