//! User-mode driver for FTDI FT232 USB serial adapters, exposed as a pseudo-terminal.
