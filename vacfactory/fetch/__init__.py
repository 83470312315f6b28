"""What the factory fetches from the network, and the guards on every download.

- :mod:`.urlpolicy`: which hosts a download may reach (the SSRF guard);
- :mod:`.safefetch`: the one HTTP(S) GET every download uses (addresses pinned, redirects
  checked, one deadline);
- :mod:`.conditional`: the conditional GET (ETag / Last-Modified) both caches revalidate with;
- :mod:`.imagecache`: root images and user_data templates, versioned and verified;
- :mod:`.pipefetch`: vacuum pipe documents into ``pipescache/``.

Nothing is imported here, so that ``config/`` can use :mod:`.urlpolicy` without loading the
fetchers (which themselves read the configuration).
"""
