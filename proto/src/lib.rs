//! IndexRelay's wire contract. The gRPC services (public `Generate`, the internal stage API,
//! health and reflection) are defined here when the distributed pipeline lands (issue 3);
//! until then the crate only reserves its place in the workspace's dependency order:
//! `proto` depends on nothing of ours, and `coordinator`/`worker` depend on it.
