//! The IndexRelay coordinator. The public gRPC/HTTP APIs, scheduler, stage planner,
//! membership and admin service arrive with issues 3 and 4; today the single-process engine
//! lives in the `worker` crate (`worker generate`).
