//! Tests of the termios mapping and of the bridge over a real pty with the fake FT232.
