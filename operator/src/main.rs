//! `tollgate-operator`: reconciles Tollgate CRDs into per-agent snapshots, serves them to
//! sidecars, and runs the admission webhooks.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tollgate-operator", version, about = "Tollgate control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CRDs (YAML), or write one file per CRD into `--out-dir`.
    Crds {
        /// Directory to write `<kind>.yaml` files into.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Run the operator: watch CRDs, serve snapshots, write status.
    Run(tollgate_operator::run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { out_dir } => {
            let crds = tollgate_operator::crd::crds();
            match out_dir {
                None => {
                    for (_, v) in &crds {
                        println!("---\n{}", tollgate_operator::crd::to_yaml(v));
                    }
                }
                Some(dir) => {
                    if let Err(e) = std::fs::create_dir_all(&dir) {
                        eprintln!("{}: {e}", dir.display());
                        return ExitCode::FAILURE;
                    }
                    for (file, v) in &crds {
                        let path = dir.join(file);
                        if let Err(e) = std::fs::write(&path, tollgate_operator::crd::to_yaml(v)) {
                            eprintln!("{}: {e}", path.display());
                            return ExitCode::FAILURE;
                        }
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Command::Run(args) => tollgate_operator::run::main(args),
    }
}
