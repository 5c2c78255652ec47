"""Reports shared by the benchmark modes: aligned text tables, JSON records, and the summary of
what was left out of the timing."""

import json


def format_optional(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(lines, left_aligned):
    """lines[0] is the header; every line is a list of strings. The first `left_aligned` columns
    are left-aligned, the others right-aligned."""
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column < left_aligned else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths))
        )
        for line in lines
    )


def write_json(path, records):
    with open(path, "w") as out:
        json.dump(records, out, indent=1)
        out.write("\n")
    print(f"wrote {len(records)} records to {path}")


def report_failures(outcomes, checked):
    """Print what was left out of the timing and why; returns the exit code.

    outcomes: (where, skipped, failures) triples, skipped and failures {provider: why}.
    """
    failed = False
    for where, skipped, failures in outcomes:
        for name, why in skipped.items():
            print(f"skipped: {name} on {where}: {why}")
        for name, why in failures.items():
            print(f"FAILED: {name} on {where}: {why}")
            failed = True
    if checked and not failed:
        print("agreement check: every provider that ran matches the float64 reference")
    return 1 if failed else 0
