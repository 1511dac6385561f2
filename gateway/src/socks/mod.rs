//! SOCKS5 (RFC 1928, RFC 1929) and the enhanced UDP mode: sans-IO codecs.
