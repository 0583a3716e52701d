"""BayesianEmbedding: BLiTZ's layer, sampling only the rows it looks up."""
import torch
import torch.nn.functional as F

from .. import functional as BF
from .. import functional_embedding as BFE
from ._low_precision import upcasts_low_precision
from ._posterior import GaussianPosteriorMixin, check_posterior_init, positive_int, posterior_parameter
from .base_bayesian_module import BayesianModule

KL_MODES = ("mc", "closed_form")


class BayesianEmbedding(GaussianPosteriorMixin, BayesianModule):
    """An embedding table W ~ N(weight_mu, softplus(weight_rho)^2), sampled on every forward.

    Arguments, defaults and parameter names (``weight_mu``, ``weight_rho``; no bias) are BLiTZ's.
    The forward samples only the rows it looks up, with the noise the whole table has there, so its
    output equals indexing a whole-table sample and its cost follows the batch, not the vocabulary.

    The KL (complexity cost) covers the whole table:

    - ``kl="mc"`` (default, BLiTZ's): ``log_variational_posterior`` / ``log_prior`` are log q(w) /
      log p(w) of a one-sample whole-table draw with the forward's seed (the looked-up rows are that
      draw's rows). This samples the whole table on every forward: the forward then costs O(V D).
    - ``kl="closed_form"``: the exact KL(q || p), one elementwise pass of torch ops over the table;
      needs a single Gaussian prior (``prior_pi`` 1 or 0, or a ``torch.distributions.Normal``
      ``prior_dist``). ``log_variational_posterior`` then holds the KL and ``log_prior`` is 0, so
      ``kl_divergence_from_nn`` and ``sample_elbo`` use it unchanged.

    Differences from BLiTZ (defects there): ``padding_idx`` rows are zeros (BLiTZ returns a sampled
    row) and get no gradient; the padding row is a constant, so it is left out of the KL and is
    initialised to zero mean, like ``nn.Embedding``. ``max_norm`` renormalises the sampled rows
    (BLiTZ renormalises its sampled table, the same thing); ``forward_frozen`` renormalises
    ``weight_mu`` in place, like ``nn.Embedding``. ``sparse=True`` is rejected: the KL's gradient
    covers the whole table, so the gradients are dense anyway.
    """

    _posterior_names = ("weight",)

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None, max_norm=None,
                 norm_type: float = 2., scale_grad_by_freq: bool = False, sparse: bool = False,
                 prior_sigma_1: float = 0.1, prior_sigma_2: float = 0.002, prior_pi: float = 1,
                 posterior_mu_init: float = 0, posterior_rho_init: float = -6.0, freeze: bool = False,
                 prior_dist=None, *, kl: str = "mc", device=None, dtype=None):
        super().__init__()
        num_embeddings = positive_int(num_embeddings, "num_embeddings")
        embedding_dim = positive_int(embedding_dim, "embedding_dim")
        check_posterior_init(posterior_mu_init, posterior_rho_init, dtype)
        if sparse:
            raise NotImplementedError("BayesianEmbedding does not support sparse=True: the KL term's gradient "
                                      "covers the whole table, so its gradients are dense")
        if kl not in KL_MODES:
            raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.padding_idx = BFE.normalize_padding_idx(padding_idx, self.num_embeddings)
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        self.sparse = False
        self.posterior_mu_init = posterior_mu_init
        self.posterior_rho_init = posterior_rho_init
        self.kl = kl
        factory = {"device": device, "dtype": dtype}
        shape = (self.num_embeddings, self.embedding_dim)
        self.weight_mu = posterior_parameter(shape, posterior_mu_init, factory)
        self.weight_rho = posterior_parameter(shape, posterior_rho_init, factory)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight_mu[self.padding_idx].zero_()
        self._init_prior(prior_sigma_1, prior_sigma_2, prior_pi, prior_dist, freeze)
        if kl == "closed_form":
            self._closed_form_prior()  # fail at construction, not at the first forward

    def reset_parameters(self) -> None:
        """The constructor's initialisation, the padding row's mean zero (see GaussianPosteriorMixin)."""
        super().reset_parameters()
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight_mu[self.padding_idx].zero_()

    @upcasts_low_precision
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze:
            return self.forward_frozen(x)
        seed = BF.draw_seed()
        lookup = (self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq)
        if self.kl == "closed_form":
            prior_sigma, prior_dist = self._closed_form_prior()
            if prior_dist is None:  # lookup and KL as one node: one pair of dense gradients
                rows, kl = BFE.bayesian_embedding_closed_form(x, self.weight_mu, self.weight_rho, prior_sigma, seed,
                                                              *lookup)
            else:
                rows = BFE.bayesian_embedding(x, self.weight_mu, self.weight_rho, seed, *lookup)
                kl = BFE.closed_form_kl(self.weight_mu, self.weight_rho, None, prior_dist, self.padding_idx)
            self._set_kl_terms(kl, kl.new_zeros(()))
            return rows
        rows = BFE.bayesian_embedding(x, self.weight_mu, self.weight_rho, seed, *lookup)
        log_prob = self.weight_prior_dist.log_prior if self.prior_dist is not None else None
        log_q, log_p = BFE.mc_kl_terms(self.weight_mu, self.weight_rho, seed, self.prior, log_prob, self.padding_idx)
        self._set_kl_terms(log_q, log_p)
        return rows

    def forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The mean-table lookup (F.embedding on weight_mu); the KL terms then describe w = mu."""
        indices = BFE.check_indices(x, self.weight_mu)
        self._set_kl_at_mean()
        out = F.embedding(indices, self.weight_mu, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, False)
        if self.padding_idx is not None:
            out = out.masked_fill((indices == self.padding_idx).unsqueeze(-1), 0)
        return out

    def _mean_kl_terms(self):
        """log q / log p at w = mu, without the padding row (a constant, not a random weight)."""
        mu, rho = self.weight_mu, self.weight_rho
        if self.padding_idx is not None:
            keep = torch.ones(self.num_embeddings, dtype=torch.bool, device=mu.device)
            keep[self.padding_idx] = False
            mu, rho = mu[keep], rho[keep]
        log_q, log_p = BF.mean_weight_kl_terms(mu, rho, self.prior)
        if self.prior_dist is not None:
            log_p = self.prior_dist.log_prob(mu).sum()
        return log_q, log_p

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}, norm_type={self.norm_type}"
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        s += (f", kl={self.kl!r}, prior=(pi={self.prior_pi}, sigma_1={self.prior_sigma_1}, "
              f"sigma_2={self.prior_sigma_2})")
        if self.prior_dist is not None:
            s += f", prior_dist={self.prior_dist}"
        return s + (", frozen" if self.freeze else "")
