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

        impl Usage {
            /// Total tokens: `total_tokens` when the reporter set it, else prompt plus completion
            /// (saturating: the figures may come from outside).
            pub fn tokens(&self) -> i64 {
                if self.total_tokens > 0 {
                    self.total_tokens
                } else {
                    self.prompt_tokens.saturating_add(self.completion_tokens)
                }
            }
        }

        impl Target {
            /// Cost of a call in micro-dollars at this target's prices, rounded up so meshgate
            /// never undercharges (and saturating rather than overflowing).
            pub fn cost_micros(&self, prompt_tokens: i64, completion_tokens: i64) -> i64 {
                let micro_per_mtok = i128::from(prompt_tokens.max(0)) * i128::from(self.input_price_micros_per_mtok)
                    + i128::from(completion_tokens.max(0)) * i128::from(self.output_price_micros_per_mtok);
                let cost = (micro_per_mtok + 999_999) / 1_000_000;
                i64::try_from(cost).unwrap_or(i64::MAX)
            }
        }

        #[cfg(test)]
        mod tests {
            use super::{Target, Usage};

            #[test]
            fn tokens_prefer_the_reported_total_and_never_overflow() {
                let usage = |p, c, t| Usage { prompt_tokens: p, completion_tokens: c, total_tokens: t, cost_micros: 0 };
                assert_eq!(usage(3, 4, 10).tokens(), 10);
                assert_eq!(usage(3, 4, 0).tokens(), 7);
                assert_eq!(usage(i64::MAX, 1, 0).tokens(), i64::MAX);
            }

            #[test]
            fn cost_rounds_up_and_never_overflows() {
                let target = Target {
                    input_price_micros_per_mtok: 150_000,
                    output_price_micros_per_mtok: 600_000,
                    ..Default::default()
                };
                assert_eq!(target.cost_micros(1_000_000, 0), 150_000);
                assert_eq!(target.cost_micros(1, 0), 1, "a fraction of a micro-dollar is charged as one");
                assert_eq!(target.cost_micros(0, 0), 0);
                assert_eq!(target.cost_micros(10, 20), 14);
                let pricey = Target { input_price_micros_per_mtok: i64::MAX, ..Default::default() };
                assert_eq!(pricey.cost_micros(i64::MAX, 0), i64::MAX);
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

        /// What a cloud accepts of one `EdgeBatch` (`POST /v1/sync/batches`), and so what an edge
        /// stages as one batch: the body as sent (gzip or not).
        pub const EDGE_BATCH_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
        /// The batch once inflated.
        pub const EDGE_BATCH_MAX_INFLATED_BYTES: usize = 32 * 1024 * 1024;
        /// Traces in one batch.
        pub const EDGE_BATCH_MAX_TRACES: usize = 10_000;
    }
}

/// Encoded `FileDescriptorSet` of every contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("meshgate_descriptor");
