// Empty: this package only brings the nginx-src crate's files (see Cargo.toml).
