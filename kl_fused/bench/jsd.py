"""`kl-fused-bench --jsd`: kl_fused.jsd_logits against TRL's generalized_jsd_loss (eager and
torch.compile) and Liger's JSD (CUDA, where installed), for each beta of --beta.

    kl-fused-bench --jsd [--beta 0.1,0.5,0.9] [--cases 512x32000:float32,...] [--pass fwd,fwd+bwd]

Per case (rows x vocab logits of one dtype), beta and pass, every provider (jsd_providers.py)
computes the batchmean generalized JSD on the same random inputs; each provider's first run is
checked against kl_fused.reference.jsd_logits in float64, then all are timed interleaved with a copy
of one input (logits_pass.py). Bytes: the floor is the KL one (2e per element for fwd, 3e for
fwd+bwd); on the CPU the floor is arithmetic (two exponentials and a logarithm per element), and
the copy is context.
"""

import sys

import kl_fused
from kl_fused import reference
from kl_fused.bench.cases import cases_from_args, make_inputs
from kl_fused.bench.jsd_providers import PROVIDERS
from kl_fused.bench.logits_pass import PASSES, bench_pass, results_table
from kl_fused.bench.options import Mode, available_providers, choices, comma_list
from kl_fused.bench.report import report_failures, write_json

DEFAULT_BETAS = "0.1,0.5,0.9"
DEFAULT_PASSES = {"cpu": "fwd+bwd", "cuda": "fwd,fwd+bwd"}


def add_arguments(parser):
    parser.add_argument("--jsd", action="store_true",
                        help="benchmark jsd_logits (generalized JSD) against TRL's generalized_jsd_loss and Liger")
    parser.add_argument("--beta", metavar="LIST", help=f"--jsd: comma list of beta in [0, 1] (default {DEFAULT_BETAS})")


def resolve(args):
    device_type = args.device.type
    args.cases = cases_from_args(args, device_type)
    args.passes = choices(args.passes or DEFAULT_PASSES[device_type], PASSES, "pass")
    args.providers = choices(args.providers or ",".join(PROVIDERS), PROVIDERS, "provider")
    try:
        args.betas = [float(beta) for beta in comma_list(args.beta or DEFAULT_BETAS)]
    except ValueError:
        raise ValueError(f"--beta must be a comma list of numbers, got {args.beta!r}") from None
    if not args.betas or not all(0 <= beta <= 1 for beta in args.betas):
        raise ValueError(f"--beta values must lie in [0, 1], got {args.beta!r}")


def run(args, environment):
    args.providers = available_providers(args.providers, PROVIDERS, args.device)
    if "fused" in args.providers and not kl_fused.is_fused_available(args.device, op="jsd_logits"):
        reason = kl_fused.fused_unavailable_reason(args.device, op="jsd_logits")
        print(f"note: NO FUSED KERNEL for {args.device.type} ({reason}): 'fused' times the reference fallback")
    print(f"providers: {', '.join(args.providers) or 'none'}; warmup {args.warmup}, reps {args.reps}, "
          f"T={args.temperature:g}, beta {', '.join(f'{beta:g}' for beta in args.betas)}")

    results = []
    units = [(case, beta, pass_name) for case in args.cases for beta in args.betas for pass_name in args.passes]
    inputs_case, student, teacher = None, None, None
    for index, (case, beta, pass_name) in enumerate(units, start=1):
        print(f"[{index}/{len(units)}] {case} beta={beta:g} {pass_name} ...", file=sys.stderr, flush=True)
        if case != inputs_case:
            student = teacher = None  # free the previous case's inputs first
            student, teacher = make_inputs(case, args.device)
            inputs_case = case
        loss_fns = {}
        for name in args.providers:
            try:
                loss_fns[name] = PROVIDERS[name].build(beta, args.temperature)
            except ValueError as error:  # a provider that does not take this beta
                print(f"note: skipping provider '{name}' at beta={beta:g}: {error}")

        def block_sum(s, t, beta=beta):
            return reference.jsd_logits(s, t, beta=beta, temperature=args.temperature, reduction="sum")

        result = bench_pass(case, pass_name, student, teacher, loss_fns, block_sum, args, environment,
                            fields={"beta": beta})
        for name, why in result.failures.items():
            print(f"ERROR: {name} on {case} beta={beta:g} {pass_name}: {why}; left out of the timing", file=sys.stderr)
        result.label = f"{case} beta={beta:g} {pass_name}"
        results.append(result)

    print(results_table(results, show_memory=args.device.type == "cuda", extra_columns=("beta",)))
    if args.json:
        write_json(args.json, [record for result in results for record in result.records])
    outcomes = [(result.label, result.skipped, result.failures) for result in results]
    return report_failures(outcomes, checked=not args.no_check)


MODE = Mode(
    name="jsd",
    add_arguments=add_arguments,
    selected=lambda args: args.jsd,
    resolve=resolve,
    run=run,
    providers={name: provider.description for name, provider in PROVIDERS.items()},
)
