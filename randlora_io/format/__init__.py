"""The randlora file format (SPEC.md): header dataclasses and their (de)serialisation (``spec``), the generators
(``philox``; the PEFT-exact draw in ``basis``), the shared bases (``basis``), the reference ΔW (``delta``), reading,
writing and validating a file (``adapter``), and base-model fingerprints (``fingerprint``)."""
