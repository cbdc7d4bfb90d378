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
                self.cost_of(&Usage { prompt_tokens, completion_tokens, ..Default::default() })
            }

            /// Cost of `usage` with each class of token at its price: prompt tokens read from
            /// or written to the provider's cache at the cache prices, the rest of the prompt at
            /// the input price, the completion (reasoning included) at the output price.
            pub fn cost_of(&self, usage: &Usage) -> i64 {
                let prompt = usage.prompt_tokens.max(0);
                let cached = usage.cached_prompt_tokens.clamp(0, prompt);
                let written = usage.cache_write_tokens.clamp(0, prompt - cached);
                let cached_price = match self.cached_input_price_micros_per_mtok {
                    0 => self.input_price_micros_per_mtok,
                    price => price,
                };
                let write_price = match self.cache_write_price_micros_per_mtok {
                    0 => self.input_price_micros_per_mtok.saturating_mul(5).saturating_add(3) / 4,
                    price => price,
                };
                let micro_per_mtok = i128::from(prompt - cached - written)
                    * i128::from(self.input_price_micros_per_mtok)
                    + i128::from(cached) * i128::from(cached_price)
                    + i128::from(written) * i128::from(write_price)
                    + i128::from(usage.completion_tokens.max(0)) * i128::from(self.output_price_micros_per_mtok);
                let cost = (micro_per_mtok + 999_999) / 1_000_000;
                i64::try_from(cost).unwrap_or(i64::MAX)
            }
        }

        #[cfg(test)]
        mod tests {
            use super::{Target, Usage};

            #[test]
            fn tokens_prefer_the_reported_total_and_never_overflow() {
                let usage =
                    |p, c, t| Usage { prompt_tokens: p, completion_tokens: c, total_tokens: t, ..Default::default() };
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

            #[test]
            fn each_class_of_token_is_charged_at_its_price() {
                let target = Target {
                    input_price_micros_per_mtok: 2_000_000,
                    cached_input_price_micros_per_mtok: 500_000,
                    output_price_micros_per_mtok: 8_000_000,
                    ..Default::default()
                };
                let usage = Usage {
                    prompt_tokens: 1_000_000,
                    cached_prompt_tokens: 800_000,
                    completion_tokens: 100_000,
                    reasoning_tokens: 60_000,
                    ..Default::default()
                };
                // 200k uncached at $2, 800k cached at $0.50, 100k out (reasoning included) at $8.
                assert_eq!(target.cost_of(&usage), 400_000 + 400_000 + 800_000);
                let no_cache_price = Target { cached_input_price_micros_per_mtok: 0, ..target.clone() };
                assert_eq!(no_cache_price.cost_of(&usage), 2_000_000 + 800_000, "never below the input price");
                let written = Usage { prompt_tokens: 1_000, cache_write_tokens: 1_000, ..Default::default() };
                assert_eq!(target.cost_of(&written), 2_500, "cache writes at 1.25 × input by default");
                let absurd = Usage { prompt_tokens: 10, cached_prompt_tokens: 50, ..Default::default() };
                assert_eq!(target.cost_of(&absurd), 5, "cached tokens count at most the prompt");
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
