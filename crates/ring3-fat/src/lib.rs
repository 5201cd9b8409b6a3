//! A FAT file system served from user mode through FUSE (fuser + fatfs).
