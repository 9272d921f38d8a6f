"""The ``tee`` group: a Gramine manifest that runs ``privlora train`` inside SGX."""

from __future__ import annotations

from pathlib import Path

import typer

from privlora.cli.choices import TEE_KEYS
from privlora.cli.common import choice, group, one_line_errors

tee_app = group(help="Trusted execution: run `privlora train` inside an Intel SGX "
                "enclave with Gramine (trusted files, encrypted data and outputs, fixed command line).")


@tee_app.command("manifest")
@one_line_errors
def tee_manifest(
    config: Path = typer.Option(..., "--config", "-c", help="Train config (YAML) the enclave will run."),
    data: Path = typer.Option(None, help="Host folder (or file) of training data, encrypted with "
                              "gramine-sgx-pf-crypt; mounted encrypted. Not needed for demo:* data."),
    out_dir: Path = typer.Option(None, "--out-dir", help="Host folder that receives the encrypted run directory "
                                 "(default: the config's out folder's parent /sgx, e.g. runs/sgx)."),
    base: str = typer.Option(None, help="Override the config's base: embedded | minilm | a model folder."),
    output: Path = typer.Option(Path("privlora.manifest"), "--output", "-o",
                                help="Manifest to write, NAME.manifest (gramine-sgx NAME runs it; atomic)."),
    enclave_size: str = typer.Option("16G", "--enclave-size", help="SGX enclave size, a power of two (K/M/G)."),
    threads: int = typer.Option(4, help="torch/OpenMP threads inside the enclave (OMP_NUM_THREADS)."),
    max_threads: int = typer.Option(None, "--max-threads", help="SGX thread slots (default 2·threads + 16)."),
    edmm: bool = typer.Option(False, "--edmm", help="Enable EDMM (memory added on demand; Linux ≥ 6.0, SGX2)."),
    debug: bool = typer.Option(False, "--debug", help="Debug enclave (its memory is readable by a debugger: "
                               "never for real data)."),
    keys: str = typer.Option("sealed", click_type=choice(TEE_KEYS),
                             help="Key of the encrypted mounts: sealed (SGX sealing key of this enclave, "
                             "no data folder) | provisioned (the data owner's key via RA-TLS secret provisioning)."),
    key_server: str = typer.Option("127.0.0.1:4433", "--key-server", help="provisioned: secret-provisioning "
                                   "server, IP:PORT."),
    ca_cert: Path = typer.Option(None, "--ca-cert", help="provisioned: CA certificate that verifies the server."),
    gramine_dir: Path = typer.Option(None, "--gramine-dir", help="Gramine's library folder (holds libsysdb.so); "
                                     "default: found in the standard install locations."),
) -> None:
    """Write a Gramine manifest that runs `privlora train --config CONFIG` inside SGX, and print the next steps
    (gramine-sgx-sign, gramine-sgx). Validates the config first (unknown keys are errors).

    Example: privlora tee manifest --config configs/demo-dp.yaml
    """
    from privlora.tee import TeeOptions, next_steps, write_manifest

    opts = TeeOptions(config=config, output=output, data=data, out_dir=out_dir, base=base,
                      enclave_size=enclave_size, threads=threads, max_threads=max_threads, edmm=edmm, debug=debug,
                      keys=keys, key_server=key_server, ca_cert=ca_cert, gramine_dir=gramine_dir)
    plan = write_manifest(opts)
    sgx = plan.manifest["sgx"]
    typer.echo(f"wrote {output}: {len(sgx['trusted_files'])} trusted entries, "
               f"{len(plan.manifest['fs']['mounts'])} mounts, enclave {sgx['enclave_size']}, "
               f"{sgx['max_threads']} threads, key {plan.key.key_name}")
    typer.echo(f"  runs: {' '.join(plan.manifest['loader']['argv'][1:])}")
    typer.echo(f"  run directory (encrypted): {plan.run_dir}")
    typer.echo("next:")
    for step in next_steps(plan, opts):
        typer.echo(f"  {step}")
