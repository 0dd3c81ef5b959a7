"""The papermill options run_all.sh passes on, checked against the notebooks' parameters cells
before any notebook runs: papermill only warns about a name a notebook does not have (`-p sed
1`), and the run would then publish the notebook's defaults as if nothing were overridden.

    python -m mesa_utils.notebook_parameters NOTEBOOK... -- [papermill options]

Exits 2 naming the first problem, 0 when every parameter exists in every notebook.
"""
import ast
import base64
import json
import sys
from pathlib import Path

import yaml

# papermill options that take one value (the parameter options are handled apart); any other
# option is a flag.
VALUED = {"-k", "--kernel", "--language", "--cwd", "--engine", "--stdout-file", "--stderr-file",
          "--autosave-cell-every", "--start-timeout", "--start_timeout", "--execution-timeout",
          "--log-level"}
# set by run_all.sh itself, from its own option
OWN = {"profile": "--profile"}


def notebook_parameters(path) -> set:
    """The names assigned in the notebook's cell tagged "parameters"."""
    notebook = json.loads(Path(path).read_text())
    for cell in notebook["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            return {target.id for node in ast.parse(source).body
                    if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for target in (node.targets if isinstance(node, ast.Assign)
                                   else [node.target])
                    if isinstance(target, ast.Name)}
    return set()


def passed_parameters(options: list) -> dict:
    """{name: the option that set it} from papermill options: -p/-r NAME VALUE, -y YAML,
    -f FILE (YAML), -b BASE64 (YAML), each also in its long form. Raises ValueError for an
    option without its values or a YAML that is not a mapping."""
    names, i = {}, 0

    def mapping(text, option):
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError:
            return {}           # papermill reports a broken YAML itself, before any run
        if not isinstance(values, dict):
            raise ValueError(f"{option} needs a YAML mapping of parameters, got {text!r}")
        return values

    while i < len(options):
        option, inline = options[i], []
        if option.startswith("--") and "=" in option:        # --cwd=notebooks
            option, rest = option.split("=", 1)
            inline = [rest]
        needs = (2 if option in ("-p", "--parameters", "-r", "--parameters_raw") else
                 1 if option in ("-y", "--parameters_yaml", "-f", "--parameters_file",
                                 "-b", "--parameters_base64") or option in VALUED else 0)
        following = needs - len(inline)
        given = inline + options[i + 1:i + 1 + following]
        if len(given) < needs:
            raise ValueError(f"{option} needs {needs} value(s)")
        i += 1 + following
        if option in ("-p", "--parameters", "-r", "--parameters_raw"):
            names[given[0]] = f"{option} {given[0]}"
        elif option in ("-y", "--parameters_yaml"):
            names.update({k: f"{option} {k}" for k in mapping(given[0], option)})
        elif option in ("-f", "--parameters_file"):
            names.update({k: f"{option} {given[0]}: {k}"
                          for k in mapping(Path(given[0]).read_text(), option)})
        elif option in ("-b", "--parameters_base64"):
            names.update({k: f"{option}: {k}"
                          for k in mapping(base64.b64decode(given[0]).decode(), option)})
    return names


def problems(notebooks: list, options: list) -> list:
    """Why these options would not do what they say on these notebooks (empty when they do)."""
    try:
        names = passed_parameters(options)
    except (ValueError, OSError) as error:
        return [f"papermill options {' '.join(options)}: {error}"]
    found = []
    for name, option in names.items():
        if name in OWN:
            found.append(f"{option}: set it with run_all.sh's {OWN[name]}, which also names "
                         "the run's folder and log (papermill's would override it silently)")
    for notebook in notebooks:
        known = notebook_parameters(notebook)
        for name, option in names.items():
            if name not in known and name not in OWN:
                found.append(f"{option}: {Path(notebook).name} has no parameter {name!r} "
                             f"(its parameters: {', '.join(sorted(known))}); papermill would "
                             "ignore it and run the defaults")
    return found


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m mesa_utils.notebook_parameters NOTEBOOK... -- [options]",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    found = problems(argv[:split], argv[split + 1:])
    for problem in found[:1]:
        print(f"error: {problem}", file=sys.stderr)
    return 2 if found else 0


if __name__ == "__main__":
    sys.exit(main())
