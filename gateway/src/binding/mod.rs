//! The two-step binding state machine (sans-IO).
