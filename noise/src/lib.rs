// Copyright (c) 2019 Cloudflare, Inc. All rights reserved.
// SPDX-License-Identifier: BSD-3-Clause
//
// Forked from boringtun 0.7.1 for skymesh.

//! WireGuard's Noise protocol: boringtun 0.7.1's `noise` module, forked.
//!
//! Why a fork (skymesh issue #14): boringtun's `Tunn` takes `&mut self` for
//! every packet although a session's crypto needs only `&self` (ring's
//! keys are immutable, the send counter is atomic, the replay window has its
//! own lock). A gateway that seals one peer's packets on several cores, or
//! seals in place into its send buffers, needs the session itself. This
//! crate is upstream's code with, in `noise::session` and `noise::mod`, an
//! additive API for that:
//!
//! - [`noise::Tunn::current_session`] and [`noise::Tunn::session_by_index`]
//!   lend the `Arc<Session>` a session is kept behind (a batch clones it
//!   once, not every packet: the count is shared with the crypto threads);
//! - [`noise::session::Session::reserve_nonces`] takes `n` consecutive
//!   nonces in one atomic step, refusing at `REJECT_AFTER_MESSAGES`
//!   (meshd takes one per packet, as the packet thread routes it, so that
//!   nonces follow read order);
//! - [`noise::session::Session::seal_in_place`] and
//!   [`noise::session::Session::open_in_place`] encrypt and decrypt a data
//!   message where it lies;
//! - [`noise::session::Session::mark_received`] checks and marks a counter
//!   in the replay window, which is 8,192 messages wide (upstream: 1,024)
//!   so that reordering across crypto workers stays inside it;
//! - a session's send counter and replay window are `CachePadded`
//!   (crossbeam-utils), away from the keys the crypto threads read;
//! - [`noise::Tunn::note_sent`] and [`noise::Tunn::note_received`] do a
//!   batch's timer bookkeeping once.
//!
//! Everything else (handshakes, cookies, timers, `encapsulate` and
//! `decapsulate`) is upstream's, unchanged, so a peer without a session, a
//! handshake or a cookie takes exactly boringtun's path.

// Upstream's code as it is: these style lints of newer toolchains are not
// worth a diff against it.
#![allow(
    clippy::doc_lazy_continuation,
    clippy::unnecessary_cast,
    clippy::manual_is_multiple_of
)]

pub mod noise;

pub(crate) mod sleepyinstant;

/// Re-export of the x25519 types
pub mod x25519 {
    pub use x25519_dalek::{
        EphemeralSecret, PublicKey, ReusableSecret, SharedSecret, StaticSecret,
    };
}
