//! The terminal chat client (`cim-client` binary), built on the SDK (`cim-sdk`). A library
//! crate as well as a binary so the unit tests of [`terminal`] reach its modules; `main.rs`
//! only hands over to [`terminal::main`].

pub mod terminal;
