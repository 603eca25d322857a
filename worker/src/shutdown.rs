//! The stop signal every IndexRelay server listens for.

/// Resolves on Ctrl-C or SIGTERM (Kubernetes and most supervisors stop processes with
/// SIGTERM), so servers drain instead of being killed mid-request.
pub async fn shutdown_signal() {
    let term = async {
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
