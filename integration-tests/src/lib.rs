//! Integration tests against the mistral.rs engine (serving work).
