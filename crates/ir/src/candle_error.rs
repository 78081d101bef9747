//! candle's errors as wick's typed errors carry them: without the
//! backtrace candle attaches whenever `RUST_BACKTRACE` is set.
//!
//! candle's `bail!` (and `Error::msg`, `wrap`, ...) wraps its error in
//! `Error::WithBacktrace` when backtraces are enabled in the environment,
//! and that variant's `Display` prints the whole backtrace after the
//! message. A wick error that boxes such an error as its source would then
//! be dozens of lines instead of one: on a terminal, in a log line, and in
//! the body of a serving error response (where it would also disclose the
//! server's internals). Every wick error that keeps a candle error keeps it
//! through [`plain_candle_error`], and every message made of one through
//! [`plain_candle_message`].

/// `error` with every backtrace candle attached removed, at any depth of
/// its `Context` and `WithPath` wrappers; its messages, context and paths
/// unchanged. (The backtrace was already captured: that cost is candle's.)
pub fn plain_candle_error(error: candle_core::Error) -> candle_core::Error {
    use candle_core::Error;
    match error {
        Error::WithBacktrace { inner, .. } => plain_candle_error(*inner),
        Error::Context { inner, context } => Error::Context {
            inner: Box::new(plain_candle_error(*inner)),
            context,
        },
        Error::WithPath { inner, path } => Error::WithPath {
            inner: Box::new(plain_candle_error(*inner)),
            path,
        },
        other => other,
    }
}

/// [`plain_candle_error`]'s message: for the errors that carry a candle
/// error as text (the ONNX importer's, the service's responses).
pub fn plain_candle_message(error: candle_core::Error) -> String {
    plain_candle_error(error).to_string()
}

#[cfg(test)]
mod tests {
    use super::plain_candle_error;
    use candle_core::Error;
    use std::backtrace::Backtrace;

    fn traced(inner: Error) -> Error {
        Error::WithBacktrace {
            inner: Box::new(inner),
            // Captured whatever RUST_BACKTRACE says: the test must not depend on it.
            backtrace: Box::new(Backtrace::force_capture()),
        }
    }

    #[test]
    fn backtraces_go_at_every_depth() {
        let traced_message = traced(Error::Msg("shape mismatch in conv".into()));
        assert!(
            traced_message.to_string().lines().count() > 1,
            "the backtrace is printed"
        );
        assert_eq!(plain_candle_error(traced_message).to_string(), "shape mismatch in conv");

        let nested = traced(
            traced(Error::Msg("inner".into()))
                .context("reading weights")
                .with_path("w.safetensors"),
        );
        let plain = plain_candle_error(nested);
        assert_eq!(plain.to_string(), "path: \"w.safetensors\" reading weights\ninner");
    }

    #[test]
    fn other_errors_are_unchanged() {
        let error = Error::UnexpectedDType {
            msg: "conv",
            expected: candle_core::DType::F32,
            got: candle_core::DType::F16,
        };
        let text = error.to_string();
        assert_eq!(plain_candle_error(error).to_string(), text);
    }
}
