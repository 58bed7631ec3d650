"""ernie-quant's typed error (the CLI prints it as one line and exits 1)."""
from libernie.errors import ErnieError


class QuantError(ErnieError):
    """ernie-quant cannot run as asked: bad options, a wrong calibration set, an unusable model."""
