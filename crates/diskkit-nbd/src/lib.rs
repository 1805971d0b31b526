//! An NBD (Network Block Device) server for diskkit images and stacks.
