//! Library target so `gateway` can name this crate as a build dependency (cache invalidation);
//! the programs are in the `gateway` binary target, built for `bpfel-unknown-none`.
#![no_std]
