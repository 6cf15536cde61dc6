//! The server's side of a gRPC connection, written in as few packets as HTTP/2 allows: what the
//! connection queues in one turn leaves in one write, so a stream's last message and the
//! trailers that end it reach the client together.
//!
//! Why it matters: a client that drops a stream before it has read the stream's end resets it
//! (RST_STREAM). Its HTTP/2 library remembers few streams it reset (h2: 50, for 1 s); a frame
//! that arrives for one it has forgotten counts as a protocol error, and after 1,024 of those in
//! the connection's life h2 closes the connection (GOAWAY ENHANCE_YOUR_CALM), failing every call
//! on it with RESOURCE_EXHAUSTED. A client that drops a watch as soon as it reads the terminal
//! event must find the stream's end already read.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Above this many bytes held, a write goes to the socket at once (and waits for it).
const HOLD_MAX: usize = 64 * 1024;

/// A connection whose writes are held until a flush finds nothing new since the flush before.
///
/// h2 flushes in the middle of a turn, after each DATA frame of 256 bytes or more, and with
/// `TCP_NODELAY` each flush is a packet: the trailers queued behind such a frame left in a later
/// packet. Here a flush that brings new bytes answers Pending and wakes the task at once, so the
/// connection comes back and buffers whatever else is queued (other streams' frames and the
/// trailers among them); the flush that brings nothing new writes it all.
pub struct Corked<T> {
    io: T,
    held: Vec<u8>,
    /// How much of `held` the socket took already.
    sent: usize,
    /// `held.len()` at the last flush that waited.
    seen: usize,
}

impl<T> Corked<T> {
    pub fn new(io: T) -> Corked<T> {
        Corked {
            io,
            held: Vec::new(),
            sent: 0,
            seen: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> Corked<T> {
    /// Writes everything held to the socket.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        self.seen = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Corked<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.held.len() >= HOLD_MAX {
            ready!(self.drain(cx))?;
        }
        self.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.held.len() >= HOLD_MAX {
            ready!(self.drain(cx))?;
        }
        let before = self.held.len();
        for b in bufs {
            self.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(self.held.len() - before))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.held.len() > self.seen && self.held.len() < HOLD_MAX {
            self.seen = self.held.len();
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Corked<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl futures::task::ArcWake for Wakes {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// What the peer can read without waiting.
    fn readable(peer: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut buf = [0u8; 1024];
        let mut rb = ReadBuf::new(&mut buf);
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match Pin::new(peer).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) => rb.filled().to_vec(),
            other => {
                assert!(other.is_pending(), "{other:?}");
                Vec::new()
            }
        }
    }

    #[test]
    fn writes_leave_together_once_a_flush_finds_nothing_new() {
        let (io, mut peer) = tokio::io::duplex(1 << 20);
        let mut c = Corked::new(io);
        let wakes = Arc::new(Wakes::default());
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut c).poll_write(&mut cx, b"data"),
            Poll::Ready(Ok(4))
        ));
        // New bytes: the flush waits for the rest of the turn, and asks to be polled again.
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        let slices = [io::IoSlice::new(b"trai"), io::IoSlice::new(b"lers")];
        assert!(matches!(
            Pin::new(&mut c).poll_write_vectored(&mut cx, &slices),
            Poll::Ready(Ok(8))
        ));
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert_eq!(readable(&mut peer), b"");
        // Nothing new since: all of it goes, in one write.
        assert!(matches!(Pin::new(&mut c).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(readable(&mut peer), b"datatrailers");
        assert!(matches!(Pin::new(&mut c).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_flush_completes_and_a_shutdown_writes_what_is_held() {
        let (io, mut peer) = tokio::io::duplex(1 << 20);
        let mut c = Corked::new(io);
        c.write_all(b"one").await.unwrap();
        c.flush().await.unwrap();
        let mut got = [0u8; 3];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one");
        c.write_all(b"two").await.unwrap();
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"two");
    }

    #[tokio::test]
    async fn past_the_limit_a_write_waits_for_the_socket() {
        let (io, mut peer) = tokio::io::duplex(HOLD_MAX / 2);
        let mut c = Corked::new(io);
        let chunk = vec![7u8; 1024];
        let writer = tokio::spawn(async move {
            for _ in 0..(2 * HOLD_MAX / chunk.len()) {
                c.write_all(&chunk).await.unwrap();
            }
            c.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), 2 * HOLD_MAX);
        assert!(got.iter().all(|b| *b == 7));
    }
}
