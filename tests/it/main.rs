//! mergesmith's integration tests: one test binary (linking the library once), a module per
//! area, helpers and recipe fixtures in `common`.

#[macro_use]
mod common;

mod arch_blocks;
mod calcmodes;
mod cli;
mod device;
mod families;
mod flux_lora;
mod fp8;
mod gen;
mod gen_flow;
mod header_props;
mod layers;
mod lora;
mod lora_supermerger;
mod merge;
mod methods;
mod noop_build;
mod numerics;
mod pickle_io;
mod recipe;
mod remote;
mod report;
mod safetensors_io;
mod sweep;
mod watch;
