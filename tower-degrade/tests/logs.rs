//! Capturing what the library logs, for the integration tests that check a log line: each
//! test crate that needs it includes it with `#[path = "../logs.rs"] mod logs;`.

#![allow(dead_code, unreachable_pub)]

/// What is logged on this thread from now until the text is read, while the guard lives.
#[derive(Debug, Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Capture this thread's logs (plain text) while the returned guard lives.
    pub fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        // A callsite another test thread was registering while this subscriber was set can
        // keep the interest it computed without it (the line is then never logged here).
        tracing::callsite::rebuild_interest_cache();
        (logs, guard)
    }

    /// The text logged so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}
