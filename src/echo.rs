//! A TCP echo endpoint: the default target of `hyrelay up`, and a test fixture.
//! Echoes until the client's EOF, then closes its own side (half-close aware).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves echo on `listener` forever; run it as a task.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown().await;
        });
    }
}

/// Binds `addr` and serves echo on a thread of its own; returns the bound address.
pub fn spawn(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    std::thread::Builder::new().name("hyrelay-echo".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("echo runtime");
        rt.block_on(async move {
            match TcpListener::from_std(std_listener) {
                Ok(l) => serve(l).await,
                Err(e) => tracing::error!(error = %e, "echo endpoint cannot listen"),
            }
        });
    })?;
    Ok(local)
}
