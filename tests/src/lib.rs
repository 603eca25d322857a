//! End-to-end tests live in `tests/tests/`; they start the real binaries built by the
//! workspace and check what a user sees.
