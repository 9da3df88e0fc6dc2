//! aerostream daemon library
