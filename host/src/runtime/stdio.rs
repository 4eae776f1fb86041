//! Guest stdout/stderr: forwarded to the host log, capped per invocation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::host::{make_span, SpanFactory};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Which guest stream a [`LogSink`] carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// An output stream that writes lines to `tracing` until a byte budget shared
/// by stdout and stderr is spent, then silently drops the rest (counting it).
/// Writes never fail, so a chatty guest is not turned into a trapping one.
#[derive(Clone)]
pub(crate) struct LogSink {
    stream: Stream,
    budget: Arc<Budget>,
    /// Makes the message's span, which lines are recorded in.
    span: Option<SpanFactory>,
}

pub(crate) struct Budget {
    remaining: AtomicUsize,
    dropped: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(bytes: usize) -> Arc<Self> {
        Arc::new(Budget {
            remaining: AtomicUsize::new(bytes),
            dropped: AtomicUsize::new(0),
        })
    }

    /// Bytes written past the budget and dropped.
    pub(crate) fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl LogSink {
    pub(crate) fn new(stream: Stream, budget: Arc<Budget>, span: Option<SpanFactory>) -> Self {
        LogSink {
            stream,
            budget,
            span,
        }
    }

    fn take(&self, len: usize) -> usize {
        let mut granted = 0;
        let _ = self
            .budget
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                granted = left.min(len);
                Some(left - granted)
            });
        self.budget
            .dropped
            .fetch_add(len - granted, Ordering::Relaxed);
        granted
    }
}

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl LogSink {
    fn write_bytes(&self, bytes: &[u8]) {
        let granted = self.take(bytes.len());
        if granted == 0 {
            return;
        }
        let enabled = match self.stream {
            Stream::Stdout => {
                tracing::enabled!(target: "ordo::guest::stdout", tracing::Level::INFO)
            }
            Stream::Stderr => {
                tracing::enabled!(target: "ordo::guest::stderr", tracing::Level::WARN)
            }
        };
        if !enabled {
            return;
        }
        let text = String::from_utf8_lossy(&bytes[..granted]);
        let span = make_span(self.span.as_ref());
        let _span = span.enter();
        for line in text.lines().filter(|l| !l.is_empty()) {
            match self.stream {
                Stream::Stdout => tracing::info!(target: "ordo::guest::stdout", "{line}"),
                Stream::Stderr => tracing::warn!(target: "ordo::guest::stderr", "{line}"),
            }
        }
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogSink {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogSink {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogSink {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
