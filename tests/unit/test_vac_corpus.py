"""A corpus of Vac 03.01 site configurations, each checked value by value against what Vac's
own ``readConf()`` resolves (written from Vac's documented and coded behaviour: see
docs/configuration.md "Reading a Vac site's files" and the reference notes it cites).

Every case is read as a Vac file (``/etc/vac.conf``): the text, the values Vac resolves, and
every warning the reader gives (file:line and a piece of its text). A case with ``error`` is one
Vac refuses too: it must be refused with that located message. The last tests read the same
texts as vacfactory's own files, which must still refuse what they refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pytest

from vacfactory.config.hostfacts import HostFacts
from vacfactory.config.loader import ConfigSources, is_vac_path, load_config, load_config_string
from vacfactory.errors import ConfigErrors

HOST = HostFacts(fqdn="vac01.example.com", cpu_count=32, mem_total_mb=65536)
SOURCE = "/etc/vac.conf"
MT_DIR = "/var/lib/vac/machinetypes"

#: lines 1-2 of most cases
S = "[settings]\nvac_space = vac01.example.com\n"


@dataclass
class Case:
    id: str
    text: str
    #: "settings.X", "mt.NAME.X", "pipe.PREFIX.X", or "machinetypes" / "pipes" (the names, in order)
    values: Dict[str, Any] = field(default_factory=dict)
    #: every warning: (line, a piece of its text); line 0: no line (the whole file)
    warnings: List[Tuple[int, str]] = field(default_factory=list)
    #: Vac refuses this too: (line, a piece of the error)
    error: Optional[Tuple[int, str]] = None


# Vac's defaults for a [settings] that only names the space (vac.conf(5) and readConf()).
VAC_DEFAULTS = {
    "settings.vac_space": "vac01.example.com", "settings.factories": (), "settings.udp_timeout_seconds": 10.0,
    "settings.mb_per_processor": 2048, "settings.hs06_per_processor": None,
    "settings.processors_per_superslot": 1, "settings.shutdown_time": None, "settings.draining": False,
    "settings.gocdb_sitename": None, "settings.description": None, "settings.version_logger": 1,
    "settings.vacmon_hostport": (), "settings.total_processors": 32, "settings.overload_per_processor": 1.25,
    "settings.disk_gb_per_processor": None, "settings.root_public_key": "/root/.ssh/id_rsa.pub",
    "settings.fix_networking": True, "settings.forward_dev": None,
    "settings.pipes_cache_dir": "/var/lib/vac/pipescache", "settings.image_cache_dir": "/var/lib/vac/imagecache",
    "machinetypes": [], "pipes": [],
}

# Vac's defaults for a machinetype that only sets its share and image.
MT_DEFAULTS = {
    "target_share": 1.0, "machine_model": "cernvm3", "user_data": None, "root_device": "vda",
    "scratch_device": "vdb", "container_command": "/user_data", "tmp_binds": (), "cvmfs_repositories": (),
    "disk_gb_per_processor": None, "min_processors": 1, "max_processors": 1, "max_wallclock_seconds": 86400,
    "min_wallclock_seconds": 86400, "backoff_seconds": 10, "fizzle_seconds": 600, "heartbeat_file": None,
    "heartbeat_seconds": 0, "accounting_fqan": None, "machines_dir_days": 3.0, "image_signing_dn": None,
    "user_data_proxy": False, "legacy_proxy": False, "startable": True,
}


def mt(name: str, **values: Any) -> Dict[str, Any]:
    """Expected values of machinetype NAME: Vac's defaults, its machinetype_path, then ``values``."""
    expected = {f"mt.{name}.{k}": v for k, v in MT_DEFAULTS.items()}
    expected[f"mt.{name}.machinetype_path"] = f"{MT_DIR}/{name}"
    expected[f"mt.{name}.root_image"] = f"{MT_DIR}/{name}/files/cernvm3.iso"
    expected[f"mt.{name}.machinegroup"] = name
    expected.update({f"mt.{name}.{k}": v for k, v in values.items()})
    return expected


def settings(**values: Any) -> Dict[str, Any]:
    expected = dict(VAC_DEFAULTS)
    expected.update({f"settings.{k}": v for k, v in values.items()})
    return expected


MT_LHCB = "[machinetype lhcb]\ntarget_share = 1\nroot_image = cernvm3.iso\n"

# Vac's example.vac.conf as the anchor study describes it: the root key it names, the unparsed
# mb_per_machine, disk_gb_per_processor = 0 (said to disable logical volumes), two machinetypes.
EXAMPLE_VAC_CONF = """\
#
#  Example /etc/vac.conf
#
[settings]
vac_space = vac01.example.com
factories = factory1.example.com factory2.example.com
root_public_key = /root/.ssh/id_rsa.pub
mb_per_machine = 2048
disk_gb_per_processor = 0
hs06_per_processor = 10.0
gocdb_sitename = UK-EXAMPLE

[machinetype example]
target_share = 1
root_image = https://repo.example.com/cernvm3.iso
user_data = example.user_data
backoff_seconds = 600
fizzle_seconds = 600
max_wallclock_seconds = 86400
heartbeat_file = heartbeat
heartbeat_seconds = 600
accounting_fqan = /example/Role=NULL/Capability=NULL
user_data_option_queue = default

[machinetype example2]
target_share = 0
root_image = https://repo.example.com/cernvm3.iso
"""

# A site written from vac.conf(5): every [settings], [machinetype] and [vacuum_pipe] option.
SITE_EVERY_OPTION = """\
[settings]
vac_space = vac.example.ac.uk
factories = vac01.example.ac.uk vac02.example.ac.uk .
udp_timeout_seconds = 5
mb_per_processor = 4096
hs06_per_processor = 11.5
processors_per_superslot = 4
shutdown_time = 1893456000
draining = no
gocdb_sitename = UKI-EXAMPLE
gocdb_cert_file = /etc/grid-security/gocdb-cert.pem
gocdb_key_file = /etc/grid-security/gocdb-key.pem
description = Example site, rack 3
version_logger = 2
vacmon_hostport = vacmon.gridpp.ac.uk:8884 VACMON.example.ac.uk:8884
total_processors = 24
overload_per_processor = 1.5
volume_group = vac_volume_group
disk_gb_per_processor = 50
root_public_key = /root/.ssh/site.pub
singularity_user = vacsing
fix_networking = true
forward_dev = eth1
user_data_option_cvmfs_proxy = http://squid.example.ac.uk:3128
user_data_file_site_ca = site-ca.pem

[machinetype lhcb]
target_share = 5
machine_model = vm-raw
root_image = /cvmfs/cernvm-prod.cern.ch/cvm4/cernvm4.img
user_data = https://lhcb.example.org/user_data
root_device = vda
scratch_device = vdb
container_command = /user_data
tmp_binds = /tmp /var/tmp
cvmfs_repositories = lhcb.cern.ch grid.cern.ch
disk_gb_per_processor = 40
min_processors = 2
max_processors = 4
max_wallclock_seconds = 172800
min_wallclock_seconds = 86400
backoff_seconds = 600
fizzle_seconds = 1200
heartbeat_file = vm-heartbeat
heartbeat_seconds = 900
accounting_fqan = /lhcb/Role=NULL/Capability=NULL
machines_dir_days = 7
image_signing_dn = /DC=ch/DC=cern/.*
user_data_proxy = true
legacy_proxy = false
user_data_option_queue = lhcb-q
user_data_file_hostkey = hostkey.pem

[vacuum_pipe gridpp]
vacuum_pipe_url = https://repo.gridpp.ac.uk/vacproject/gridpp/gridpp.pipe
target_share = 3
backoff_seconds = 300
"""

SITE_LEGACY_NAMES = """\
[settings]
vac_space = vac.legacy.example.com
cpu_total = 16
mb_per_cpu = 3000
hs06_per_cpu = 9.5
overload_per_cpu = 2
scratch_gb = 30
vcpu_per_machine = 2
domain_type = xen
total_machines = 16
delete_old_files = yes

[vmtype atlas]
target_share = 2
vm_model = cernvm3
root_image = cernvm3.iso
machineoutputs_days = 1.5
cernvm_signing_dn = /DC=ch/DC=cern/OU=computers/CN=cvm-sign01.cern.ch
"""

CASES: List[Case] = [
    # ---------------------------------------------------------------- whole configurations
    Case("minimal", S, settings()),
    Case("example.vac.conf", EXAMPLE_VAC_CONF,
         dict(settings(factories=("factory1.example.com", "factory2.example.com"), disk_gb_per_processor=0,
                       hs06_per_processor=10.0, gocdb_sitename="UK-EXAMPLE"),
              machinetypes=["example", "example2"],
              **mt("example", root_image="https://repo.example.com/cernvm3.iso",
                   user_data=f"{MT_DIR}/example/files/example.user_data", backoff_seconds=600,
                   heartbeat_file="heartbeat", heartbeat_seconds=600,
                   accounting_fqan="/example/Role=NULL/Capability=NULL",
                   machinegroup="/example/Role=NULL/Capability=NULL", user_data_options={"queue": "default"}),
              **mt("example2", target_share=0.0, root_image="https://repo.example.com/cernvm3.iso")),
         [(8, "mb_per_machine: ignored: Vac never read it either")]),
    Case("site using every vac.conf(5) option", SITE_EVERY_OPTION,
         dict(settings(vac_space="vac.example.ac.uk",
                       factories=("vac01.example.ac.uk", "vac02.example.ac.uk", "."), udp_timeout_seconds=5.0,
                       mb_per_processor=4096, hs06_per_processor=11.5, processors_per_superslot=4,
                       shutdown_time=1893456000, gocdb_sitename="UKI-EXAMPLE",
                       gocdb_cert_file="/etc/grid-security/gocdb-cert.pem",
                       gocdb_key_file="/etc/grid-security/gocdb-key.pem", description="Example site, rack 3",
                       version_logger=2, vacmon_hostport=("vacmon.gridpp.ac.uk:8884", "vacmon.example.ac.uk:8884"),
                       total_processors=24, overload_per_processor=1.5, volume_group="vac_volume_group",
                       disk_gb_per_processor=50, root_public_key="/root/.ssh/site.pub", singularity_user="vacsing",
                       forward_dev="eth1",
                       user_data_options={"cvmfs_proxy": "http://squid.example.ac.uk:3128"},
                       user_data_files={"site_ca": "site-ca.pem"}),
              machinetypes=["lhcb"], pipes=["gridpp"],
              **mt("lhcb", target_share=5.0, machine_model="vm-raw",
                   root_image="/cvmfs/cernvm-prod.cern.ch/cvm4/cernvm4.img",
                   user_data="https://lhcb.example.org/user_data", tmp_binds=("/tmp", "/var/tmp"),
                   cvmfs_repositories=("lhcb.cern.ch", "grid.cern.ch"), disk_gb_per_processor=40,
                   min_processors=2, max_processors=4, max_wallclock_seconds=172800,
                   min_wallclock_seconds=86400, backoff_seconds=600, fizzle_seconds=1200,
                   heartbeat_file="vm-heartbeat", heartbeat_seconds=900,
                   accounting_fqan="/lhcb/Role=NULL/Capability=NULL",
                   machinegroup="/lhcb/Role=NULL/Capability=NULL", machines_dir_days=7.0,
                   image_signing_dn="/DC=ch/DC=cern/.*", user_data_proxy=True, legacy_proxy=False,
                   user_data_options={"cvmfs_proxy": "http://squid.example.ac.uk:3128", "queue": "lhcb-q"},
                   user_data_files={"site_ca": f"{MT_DIR}/lhcb/files/site-ca.pem",
                                    "hostkey": f"{MT_DIR}/lhcb/files/hostkey.pem"}),
              **{"pipe.gridpp.vacuum_pipe_url": "https://repo.gridpp.ac.uk/vacproject/gridpp/gridpp.pipe",
                 "pipe.gridpp.target_share": 3.0, "pipe.gridpp.options": {"backoff_seconds": "300"}}),
         [(11, "gocdb_cert_file: accepted for compatibility with Vac and ignored"),
          (12, "gocdb_key_file: accepted for compatibility with Vac and ignored"),
          (14, "version_logger: accepted for compatibility with Vac and ignored"),
          (18, "volume_group: accepted for compatibility with Vac and ignored"),
          (21, "singularity_user: accepted for compatibility with Vac and ignored"),
          (22, "fix_networking: accepted for compatibility with Vac and ignored"),
          (48, "image_signing_dn: accepted for compatibility with Vac and ignored"),
          (0, "pipe gridpp")]),
    Case("site with Vac's deprecated names", SITE_LEGACY_NAMES,
         dict(settings(vac_space="vac.legacy.example.com", total_processors=16, mb_per_processor=3000,
                       hs06_per_processor=9.5, overload_per_processor=2.0, disk_gb_per_processor=30,
                       processors_per_superslot=2, domain_type="kvm"),
              machinetypes=["atlas"],
              **mt("atlas", target_share=2.0, machines_dir_days=1.5,
                   image_signing_dn="/DC=ch/DC=cern/OU=computers/CN=cvm-sign01.cern.ch")),
         [(3, "cpu_total: deprecated: use total_processors"), (4, "mb_per_cpu: deprecated"),
          (5, "hs06_per_cpu: deprecated"), (6, "overload_per_cpu: deprecated"), (7, "scratch_gb: deprecated"),
          (8, "vcpu_per_machine: deprecated"), (9, "'xen' is deprecated here: use kvm"),
          (10, "total_machines: ignored: use total_processors"), (11, "delete_old_files: ignored"),
          (13, "[vmtype atlas] deprecated section kind: use [machinetype atlas]"),
          (15, "vm_model: deprecated: use machine_model"), (17, "machineoutputs_days: deprecated"),
          (18, "cernvm_signing_dn: accepted for compatibility with Vac and ignored")]),
    Case("docker machinetypes are started, singularity ones load and are never started",
         S + "[machinetype dc]\ntarget_share = 1\nmachine_model = docker\nroot_image = docker://cern/cc7-base\n"
             "[machinetype sc]\ntarget_share = 1\nmachine_model = singularity\nroot_image = /cvmfs/unpacked/cc7\n",
         dict(settings(), machinetypes=["dc", "sc"],
              **{"mt.dc.startable": True, "mt.dc.root_image": "docker://cern/cc7-base",
                 "mt.sc.startable": False, "mt.sc.root_image": "/cvmfs/unpacked/cc7"}),
         [(9, "machine_model singularity is understood")]),
    # ---------------------------------------------------------------- Python 2 RawConfigParser syntax
    Case("inline ; comment after whitespace", S + "total_processors = 16 ; half the host\n",
         settings(total_processors=16)),
    Case("inline ; comment after a tab", S + "mb_per_processor = 3000\t;per processor\n",
         settings(mb_per_processor=3000)),
    Case("; without whitespace before it stays", S + "description = rack3;row2\n",
         settings(description="rack3;row2")),
    Case("only the first ; counts", S + "description = a;b ; c\n", settings(description="a;b ; c")),
    Case("# inline is part of a text value", S + "description = main site # rack 3\n",
         settings(description="main site # rack 3")),
    Case("# inline in a number is refused, as by Vac", S + "total_processors = 16 # half\n",
         error=(3, "'16 # half' is not an integer")),
    Case("name: value", "[settings]\nvac_space: vac01.example.com\nmb_per_processor:4096\n",
         settings(mb_per_processor=4096)),
    Case("option names are case-folded", "[settings]\nVAC_SPACE = vac01.example.com\nMb_Per_Processor = 1024\n",
         settings(mb_per_processor=1024)),
    Case("continuation lines", S + "factories = a.example.com\n  b.example.com\n\tc.example.com\n",
         settings(factories=("a.example.com", "b.example.com", "c.example.com"))),
    Case("a blank line does not end a value", S + "factories = a.example.com\n\n  b.example.com\n",
         settings(factories=("a.example.com", "b.example.com"))),
    Case("an indented # line continues the value", S + "description = one\n  # two\n",
         settings(description="one\n# two")),
    Case("whole-line comments and rem", "# comment\n; comment\n[settings]\nrem a remark\nREM another\n"
                                        "vac_space = vac01.example.com\n#mb_per_processor = 1\n",
         settings()),
    Case("text after a header's ] is ignored", "[settings] ; main section\nvac_space = vac01.example.com\n",
         settings()),
    Case("a value of two double quotes is empty", S + 'description = ""\n', settings(description="")),
    Case("Windows line ends", "[settings]\r\nvac_space = vac01.example.com\r\ntotal_processors = 4\r\n",
         settings(total_processors=4)),
    Case("the same option twice: the last wins", S + "mb_per_processor = 1000\nmb_per_processor = 3000\n",
         settings(mb_per_processor=3000), [(4, "also given at line 3: the last one wins, as in Vac")]),
    Case("the same section twice: merged, the last wins",
         S + "mb_per_processor = 1000\n[settings]\nmb_per_processor = 3000\ntotal_processors = 8\n",
         settings(mb_per_processor=3000, total_processors=8)),
    Case("alias, then its canonical name: the canonical wins", S + "cpu_total = 4\ntotal_processors = 8\n",
         settings(total_processors=8),
         [(3, "cpu_total: deprecated: use total_processors"),
          (4, "total_processors: also given as cpu_total at line 3: the last one wins")]),
    Case("canonical name, then its alias: the alias wins", S + "total_processors = 8\ncpu_total = 4\n",
         settings(total_processors=4),
         [(4, "cpu_total: deprecated: use total_processors"),
          (4, "cpu_total: also given as total_processors at line 3: the last one wins")]),
    Case("[DEFAULT] applies to every section; a section's own value wins",
         "[DEFAULT]\nfizzle_seconds = 300\nbackoff_seconds = 60\n" + S + MT_LHCB
         + "backoff_seconds = 30\n[machinetype atlas]\ntarget_share = 1\nroot_image = cernvm3.iso\n",
         dict(settings(), machinetypes=["lhcb", "atlas"],
              **mt("lhcb", fizzle_seconds=300, backoff_seconds=30), **mt("atlas", fizzle_seconds=300,
                                                                          backoff_seconds=60))),
    Case("[DEFAULT] gives [settings] its values", "[DEFAULT]\nvac_space = vac09.example.com\n[settings]\n",
         settings(vac_space="vac09.example.com")),
    Case("[DEFAULT] user_data_option_XXX reaches settings and machinetypes",
         "[DEFAULT]\nuser_data_option_site = UK\n" + S + MT_LHCB,
         dict(settings(user_data_options={"site": "UK"}), machinetypes=["lhcb"],
              **mt("lhcb", user_data_options={"site": "UK"}))),
    Case("[DEFAULT] option no section takes", "[DEFAULT]\nmb_per_procesor = 1\n" + S,
         settings(), [(2, "[DEFAULT] mb_per_procesor: ignored: no section Vac 03.01 reads takes it "
                          "(did you mean mb_per_processor?)")]),
    Case("machinetype names are lower-cased",
         S + "[machinetype LHCb-Test]\ntarget_share = 1\nroot_image = cernvm3.iso\n",
         dict(settings(), machinetypes=["lhcb-test"], **mt("lhcb-test"))),
    Case("section kinds are lower-cased", S + "[MachineType ATLAS]\ntarget_share = 1\nroot_image = cernvm3.iso\n",
         dict(settings(), machinetypes=["atlas"], **mt("atlas"))),
    Case("vacuum pipe prefixes are lower-cased",
         S + "[vacuum_pipe GridPP]\nvacuum_pipe_url = https://repo.example.com/gridpp.pipe\ntarget_share = 2\n",
         dict(settings(), pipes=["gridpp"], **{"pipe.gridpp.target_share": 2.0}),
         [(0, "pipe gridpp")]),
    Case("a machinetype name Vac refuses", S + "[machinetype lhcb_test]\ntarget_share = 1\n",
         error=(3, "machinetype name 'lhcb_test' must match [a-z0-9-]+")),
    # ---------------------------------------------------------------- what Vac ignores
    Case("a section Vac does not read", S + "[monitoring]\nnagios = yes\nport = 5666\n",
         settings(), [(3, "[monitoring] ignored: Vac 03.01 does not read this section")]),
    Case("a near-miss section", S + "[machintype lhcb]\ntarget_share = 1\n",
         settings(), [(3, "ignored: Vac 03.01 does not read this section (did you mean machinetype?)")]),
    Case("[targetshares] is ignored", S + "[targetshares]\nlhcb = 1\n",
         settings(), [(3, "[targetshares] ignored: Vac 03.01 does not read this section")]),
    Case("[factories] is ignored", S + "[factories]\nnames = a.example.com\n",
         settings(), [(3, "[factories] ignored")]),
    Case("[Settings] is not Vac's [settings]", S + "[Settings]\nmb_per_processor = 1\n",
         settings(), [(3, "[Settings] ignored: Vac reads only a section named exactly [settings]")]),
    Case("[machinetype] without a name", S + "[machinetype]\ntarget_share = 1\n",
         settings(), [(3, "ignored: needs a name: [machinetype NAME]")]),
    Case("an unknown option with a near miss", S + "mb_per_procesor = 4096\n",
         settings(), [(3, "mb_per_procesor: ignored: Vac 03.01 does not read it; unknown option "
                          "(did you mean mb_per_processor?)")]),
    Case("an unknown option far from any", S + "colour = blue\n",
         settings(), [(3, "colour: ignored: Vac 03.01 does not read it; unknown option")]),
    Case("a machinetype option near miss", S + MT_LHCB + "target_shares = 2\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb")),
         [(6, "target_shares: ignored: Vac 03.01 does not read it; unknown option (did you mean target_share?)")]),
    Case("a [settings] option in a machinetype", S + MT_LHCB + "mb_per_processor = 1\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb")),
         [(6, "mb_per_processor: ignored: Vac 03.01 does not read it; unknown option here: mb_per_processor "
              "belongs in [settings]")]),
    Case("options Vac ignores in a machinetype",
         S + MT_LHCB + "rootpublickey = /root/.ssh/x.pub\nroot_public_key = /root/.ssh/x.pub\n"
                       "log_machineoutputs = true\nuser_data_proxy_cert = c.pem\nuser_data_proxy_key = k.pem\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb")),
         [(6, "rootpublickey: ignored"), (7, "root_public_key: ignored"), (8, "log_machineoutputs: ignored"),
          (9, "user_data_proxy_cert: ignored"), (10, "user_data_proxy_key: ignored")]),
    Case("disk_gb_per_processor = 40GB in a machinetype", S + MT_LHCB + "disk_gb_per_processor = 40GB\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb", disk_gb_per_processor=None)),
         [(6, "'40GB' is not an integer: ignored, as Vac 03.01 ignores this option in a machinetype")]),
    Case("a machinetype disk_gb_per_processor that is a count",
         S + "disk_gb_per_processor = 40\n" + MT_LHCB + "disk_gb_per_processor = 20\n",
         dict(settings(disk_gb_per_processor=40), machinetypes=["lhcb"], **mt("lhcb", disk_gb_per_processor=20))),
    Case("an ignored option with a value vacfactory cannot parse", S + MT_LHCB + "image_signing_dn = [unclosed\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb", image_signing_dn=None)),
         [(6, "image_signing_dn: accepted for compatibility with Vac and ignored"),
          (6, "is not a valid regular expression")]),
    Case("a machinefeatures_option_XXX vacfactory writes itself", S + "machinefeatures_option_hs06 = 99\n"
                                                                         "machinefeatures_option_rack = r3\n",
         settings(machinefeatures_options={"rack": "r3"}),
         [(3, "'hs06' is a standard or legacy machinefeatures key, which vacfactory writes itself: choose another "
              "name: ignored")]),
    Case("a user_data_option_XXX name outside [a-z0-9_]", S + "user_data_option_a.b = 1\nuser_data_option_ok = 2\n",
         settings(user_data_options={"ok": "2"}),
         [(3, "the name after user_data_option_ must match [a-z0-9_]+: ignored")]),
    Case("an unknown option in a vacuum pipe",
         S + "[vacuum_pipe vo]\nvacuum_pipe_url = https://example.org/vo.pipe\ntarget_sahre = 1\n",
         dict(settings(), pipes=["vo"], **{"pipe.vo.target_share": 0.0, "pipe.vo.options": {}}),
         [(5, "target_sahre: ignored: Vac 03.01 does not read it; unknown option (did you mean target_share?)"),
          (0, "pipe vo")]),
    # ---------------------------------------------------------------- Vac's values
    Case("an empty description", S + "description =\n", settings(description="")),
    Case("an empty option without a default is unset", S + "gocdb_sitename =\nforward_dev =\n",
         settings(gocdb_sitename=None, forward_dev=None)),
    Case("version_logger = no", S + "version_logger = no\n", settings(version_logger=0),
         [(3, "version_logger: accepted for compatibility"), (3, "'no' is not true, false or a count: read as 0")]),
    Case("version_logger = true", S + "version_logger = true\n", settings(version_logger=1),
         [(3, "version_logger: accepted for compatibility")]),
    Case("version_logger = false", S + "version_logger = false\n", settings(version_logger=0),
         [(3, "version_logger: accepted for compatibility")]),
    Case("draining = yes", S + "draining = yes\n", settings(draining=True)),
    Case("draining = YES", S + "draining = YES\n", settings(draining=True)),
    Case("draining = true is off", S + "draining = true\n", settings(draining=False),
         [(3, "'true' is off in a Vac file (Vac turns this on only for 'yes')")]),
    Case("draining = 1 is off", S + "draining = 1\n", settings(draining=False), [(3, "'1' is off in a Vac file")]),
    Case("draining = maybe is off", S + "draining = maybe\n", settings(draining=False)),
    Case("user_data_proxy and legacy_proxy = true", S + MT_LHCB + "user_data_proxy = true\nlegacy_proxy = True\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb", user_data_proxy=True, legacy_proxy=True))),
    Case("user_data_proxy = yes and legacy_proxy = 1 are off",
         S + MT_LHCB + "user_data_proxy = yes\nlegacy_proxy = 1\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb", user_data_proxy=False, legacy_proxy=False)),
         [(6, "'yes' is off in a Vac file (Vac turns this on only for 'true')"), (7, "'1' is off in a Vac file")]),
    Case("fix_networking = false", S + "fix_networking = false\n", settings(fix_networking=False),
         [(3, "fix_networking: accepted for compatibility")]),
    Case("fix_networking = no is off", S + "fix_networking = no\n", settings(fix_networking=False),
         [(3, "fix_networking: accepted for compatibility")]),
    Case("target_share = -1 is never started", S + MT_LHCB + "target_share = -1\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb", target_share=0.0)),
         [(6, "a negative share is read as 0 (never started)"),
          (6, "target_share: also given at line 4: the last one wins")]),
    Case("total_processors = 0", S + "total_processors = 0\n", settings(total_processors=0)),
    Case("overload_per_processor = 0", S + "overload_per_processor = 0\n", settings(overload_per_processor=0.0)),
    Case("accounting_fqan = lhcb", S + MT_LHCB + "accounting_fqan = lhcb\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb", accounting_fqan=None, machinegroup="lhcb")),
         [(6, "'lhcb' does not start with '/': APEL refuses such an FQAN, so records of this machinetype carry none")]),
    Case("a share-0 machinetype without root_image", S + "[machinetype spare]\ntarget_share = 0\n",
         dict(settings(), machinetypes=["spare"],
              **mt("spare", target_share=0.0, root_image=None, startable=False))),
    Case("a machinetype without target_share or root_image", S + "[machinetype spare]\nmax_processors = 2\n",
         dict(settings(), machinetypes=["spare"],
              **mt("spare", target_share=0.0, root_image=None, startable=False, max_processors=2))),
    Case("a shared machinetype without root_image loads, never started", S + "[machinetype lhcb]\ntarget_share = 1\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb", root_image=None, startable=False)),
         [(3, "no root_image (or kernel_image): this machinetype is never started")]),
    Case("an empty root_image", S + "[machinetype lhcb]\ntarget_share = 0\nroot_image =\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb", target_share=0.0, root_image=None, startable=False))),
    Case("min_wallclock_seconds > max_wallclock_seconds",
         S + MT_LHCB + "max_wallclock_seconds = 3600\nmin_wallclock_seconds = 7200\n",
         dict(settings(), machinetypes=["lhcb"],
              **mt("lhcb", max_wallclock_seconds=3600, min_wallclock_seconds=7200)),
         [(7, "more than max_wallclock_seconds (3600): loaded as Vac does")]),
    Case("min_wallclock_seconds defaults to max_wallclock_seconds", S + MT_LHCB + "max_wallclock_seconds = 3600\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb", max_wallclock_seconds=3600, min_wallclock_seconds=3600))),
    Case("a docker:// image on a VM model", S + "[machinetype lhcb]\ntarget_share = 1\nroot_image = docker://x/y\n",
         dict(settings(), machinetypes=["lhcb"], **mt("lhcb", root_image=None, startable=False)),
         [(5, "a docker:// image needs machine_model = docker: no VM is started from it"),
          (5, "no root_image (or kernel_image): this machinetype is never started")]),
    Case("factories and vacmon_hostport are lower-cased",
         S + "factories = WN01.Example.COM .\nvacmon_hostport = VacMon.Example.com:8884\n",
         settings(factories=("wn01.example.com", "."), vacmon_hostport=("vacmon.example.com:8884",))),
    Case("floats where Vac uses float()", S + "hs06_per_processor = 10\nudp_timeout_seconds = 2.5\n",
         settings(hs06_per_processor=10.0, udp_timeout_seconds=2.5)),
    Case("int('600.0') is refused, as by Vac", S + MT_LHCB + "fizzle_seconds = 600.0\n",
         error=(6, "'600.0' is not an integer")),
    Case("max_processors < min_processors is refused, as by Vac",
         S + MT_LHCB + "min_processors = 4\nmax_processors = 2\n",
         error=(7, "must be >= min_processors (4)")),
    Case("more processors than the host is refused, as by Vac", S + "total_processors = 64\n",
         error=(3, "must be <= this host's 32 processors")),
    Case("no [settings] is refused, as by Vac", MT_LHCB, error=(0, "vac_space: required option is missing")),
    Case("no vac_space is refused, as by Vac", "[settings]\nmb_per_processor = 4096\n",
         error=(1, "vac_space: required option is missing")),
    Case("an indented line right after a header is refused, as by Vac", "[settings]\n  vac_space = x.example.com\n",
         error=(2, "cannot parse this line")),
    Case("text before the first header is refused, as by Vac", "vac_space = x.example.com\n[settings]\n",
         error=(1, "this line comes before any [section] header")),
    # ---------------------------------------------------------------- Vac's paths
    Case("relative root_image, user_data and user_data_file_XXX are under Vac's files/",
         S + "user_data_file_ca = ca.pem\n" + MT_LHCB + "user_data = lhcb.user_data\nuser_data_file_key = k.pem\n",
         dict(settings(user_data_files={"ca": "ca.pem"}), machinetypes=["lhcb"],
              **mt("lhcb", user_data=f"{MT_DIR}/lhcb/files/lhcb.user_data",
                   user_data_files={"ca": f"{MT_DIR}/lhcb/files/ca.pem", "key": f"{MT_DIR}/lhcb/files/k.pem"}))),
    Case("absolute paths and URLs stay",
         S + "[machinetype lhcb]\ntarget_share = 1\nroot_image = /images/cernvm3.iso\n"
             "user_data = https://example.org/ud\n",
         dict(settings(), machinetypes=["lhcb"],
              **mt("lhcb", root_image="/images/cernvm3.iso", user_data="https://example.org/ud"))),
    Case("an explicit machinetype_path", S + MT_LHCB + "machinetype_path = /srv/lhcb\n",
         dict(settings(), machinetypes=["lhcb"],
              **mt("lhcb", machinetype_path="/srv/lhcb", root_image="/srv/lhcb/files/cernvm3.iso"))),
    Case("vacfactory options in a Vac file are read as vacfactory's",
         S + "state_dir = /srv/vf\npipes_cache_dir = /srv/pipes\ncycle_seconds = 5\n",
         settings(state_dir="/srv/vf", pipes_cache_dir="/srv/pipes", cycle_seconds=5.0)),
]


def _value(config: Any, key: str) -> Any:
    if key == "machinetypes":
        return list(config.machinetypes)
    if key == "pipes":
        return list(config.vacuum_pipes)
    kind, _, rest = key.partition(".")
    if kind == "settings":
        value = getattr(config.settings, rest)
    else:
        name, _, option = rest.rpartition(".")
        holder = config.machinetypes[name] if kind == "mt" else config.vacuum_pipes[name]
        value = getattr(holder, option)
    return dict(value) if hasattr(value, "keys") else value


def _check_warnings(warnings: List[str], expected: List[Tuple[int, str]]) -> None:
    unmatched = list(warnings)
    for line, text in expected:
        prefix = f"{SOURCE}:{line}: " if line else ""
        found = next((w for w in unmatched if w.startswith(prefix) and text in w), None)
        assert found is not None, f"no warning {prefix}...{text!r} in {warnings}"
        unmatched.remove(found)
    assert unmatched == [], f"unexpected warnings: {unmatched}"


def test_the_corpus_is_big_enough_and_names_are_unique():
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_vac_reads_each_configuration_as_vac_does(case: Case, tmp_path):
    path = tmp_path / "etc" / "vac.conf"
    path.parent.mkdir()
    path.write_text(case.text, encoding="utf-8")
    sources = ConfigSources.for_main_file(str(path), vac_runtime_file=str(tmp_path / "run" / "vac.conf"))
    assert sources.vac
    if case.error is not None:
        with pytest.raises(ConfigErrors) as raised:
            load_config(sources, host_facts=HOST)
        line, text = case.error
        located = [str(e).replace(str(path), SOURCE) for e in raised.value.errors]
        prefix = f"{SOURCE}:{line}: " if line else f"{SOURCE}: "
        assert any(e.startswith(prefix) and text in e for e in located), located
        return
    config = load_config(sources, host_facts=HOST)
    for key, expected in case.values.items():
        assert _value(config, key) == expected, key
    _check_warnings([w.replace(str(path), SOURCE) for w in config.warnings], case.warnings)


# ---------------------------------------------------------------- vacfactory's own files stay strict

#: corpus cases whose text vacfactory's own files refuse, and a piece of the (first) error
STRICT_REFUSES = {
    "inline ; comment after whitespace": "'16 ; half the host' is not an integer",
    "the same option twice: the last wins": "given twice in this section (first at line 3)",
    "alias, then its canonical name: the canonical wins": "also given as cpu_total at line 3",
    "[DEFAULT] applies to every section; a section's own value wins": "unknown section",
    "machinetype names are lower-cased": "machinetype name 'LHCb-Test' must match",
    "a section Vac does not read": "unknown section",
    "[targetshares] is ignored": "use a target_share option in each [machinetype NAME] section",
    "an unknown option with a near miss": "unknown option (did you mean mb_per_processor?)",
    "a [settings] option in a machinetype": "unknown option here: mb_per_processor belongs in [settings]",
    "disk_gb_per_processor = 40GB in a machinetype": "'40GB' is not an integer",
    "an empty description": "description: must not be empty",
    "version_logger = no": "'no' is not an integer",
    "target_share = -1 is never started": "must be >= 0 (got -1)",
    "total_processors = 0": "must be >= 1 (got 0)",
    "overload_per_processor = 0": "must be > 0 (got 0)",
    "accounting_fqan = lhcb": "APEL refuses such a record",
    "a share-0 machinetype without root_image": "root_image (or kernel_image) is required",
    "min_wallclock_seconds > max_wallclock_seconds": "must be <= max_wallclock_seconds (3600)",
    "a docker:// image on a VM model": "a docker:// image needs machine_model = docker",
    "draining = maybe is off": "'maybe' is not a boolean",
}

#: corpus cases whose text loads in vacfactory's own files too, but means something else
STRICT_READS = {
    "draining = true is off": {"settings.draining": True},
    "draining = 1 is off": {"settings.draining": True},
    "user_data_proxy = yes and legacy_proxy = 1 are off": {"mt.lhcb.user_data_proxy": True,
                                                          "mt.lhcb.legacy_proxy": True},
    "relative root_image, user_data and user_data_file_XXX are under Vac's files/": {
        "mt.lhcb.machinetype_path": "{state}/machinetypes/lhcb",
        "mt.lhcb.user_data": "{state}/machinetypes/lhcb/files/lhcb.user_data"},
    "[Settings] is not Vac's [settings]": {"settings.mb_per_processor": 1},
    "minimal": {"settings.pipes_cache_dir": "{state}/pipescache", "settings.image_cache_dir": "{state}/imagecache"},
}

_BY_ID = {case.id: case for case in CASES}


def _strict_sources(tmp_path, text: str) -> ConfigSources:
    path = tmp_path / "factory.conf"
    path.write_text(text, encoding="utf-8")
    sources = ConfigSources.for_main_file(str(path))
    assert not sources.vac
    return sources


@pytest.mark.parametrize("case_id", sorted(STRICT_REFUSES))
def test_vacfactory_files_still_refuse_what_they_refused(case_id, tmp_path):
    sources = _strict_sources(tmp_path, _BY_ID[case_id].text)
    with pytest.raises(ConfigErrors) as raised:
        load_config(sources, host_facts=HOST)
    assert STRICT_REFUSES[case_id] in str(raised.value)


@pytest.mark.parametrize("case_id", sorted(STRICT_READS))
def test_vacfactory_files_keep_their_own_reading(case_id, tmp_path):
    state = tmp_path / "state"
    text = _BY_ID[case_id].text.replace("[settings]\n", f"[settings]\nstate_dir = {state}\n", 1)
    config = load_config(_strict_sources(tmp_path, text), host_facts=HOST)
    for key, expected in STRICT_READS[case_id].items():
        if isinstance(expected, str):
            expected = expected.format(state=state)
        assert _value(config, key) == expected, key


# ---------------------------------------------------------------- which files are Vac's, and how they combine


def test_vac_paths_are_read_as_vac_and_others_are_not(tmp_path):
    for path in ("/etc/vac.conf", "/etc/vac.d/10-shares.conf", "/var/run/vac.conf", str(tmp_path / "vac.conf")):
        assert is_vac_path(path) and ConfigSources.for_main_file(path).vac, path
    for path in ("/etc/vacfactory.conf", "/etc/vac.d.conf", "/etc/vacfactory.d/vac.conf.bak", "/srv/vac.cfg"):
        assert not is_vac_path(path) and not ConfigSources.for_main_file(path).vac, path
    assert not ConfigSources.default().vac
    # any file, read as Vac's when asked (tests, or a site keeping a copy elsewhere)
    other = tmp_path / "site.conf"
    other.write_text(S + "draining = true\n", encoding="utf-8")
    assert load_config(ConfigSources.for_main_file(str(other), vac=True), host_facts=HOST).settings.draining is False
    assert load_config(ConfigSources.for_main_file(str(other)), host_facts=HOST).settings.draining is True


def _write(path, text):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_vac_d_then_vac_conf_then_var_run_vac_conf_and_the_override_stays_strict(tmp_path):
    etc, state = tmp_path / "etc", tmp_path / "state"
    _write(etc / "vac.d" / "20-lhcb.conf", MT_LHCB + "fizzle_seconds = 60 ; short\n")
    _write(etc / "vac.d" / "10-space.conf", S + f"state_dir = {state}\nmb_per_processor = 1000\n")
    _write(etc / "vac.d" / "30-off.conf.rpmsave", "[settings]\nmb_per_processor = 9999\n")
    main = _write(etc / "vac.conf", "[settings]\nmb_per_processor = 3000\n[machinetype LHCb]\ntarget_share = 4\n")
    runtime = _write(tmp_path / "run" / "vac.conf", "[settings]\ndraining = true\nshutdown_time = 1893456000\n")
    sources = ConfigSources.for_main_file(main, vac_runtime_file=runtime)
    config = load_config(sources, host_facts=HOST)
    assert (config.settings.mb_per_processor, config.settings.draining) == (3000, False)  # Vac's 'true' is off
    assert config.settings.shutdown_time == 1893456000
    assert (config.machinetypes["lhcb"].target_share, config.machinetypes["lhcb"].fizzle_seconds) == (4.0, 60)
    assert any(w.startswith(f"{runtime}:2: [settings] draining: 'true' is off in a Vac file") for w in config.warnings)
    # vacfactory's own runtime override (written by `vacfactory drain`) is read strictly
    _write(state / "runtime.conf", "[settings]\ndraining = true\n")
    assert load_config(sources, host_facts=HOST).settings.draining is True
    _write(state / "runtime.conf", "[settings]\ndraining = true ; now\n")
    with pytest.raises(ConfigErrors, match=r"runtime.conf:2: \[settings\] draining: 'true ; now' is not a boolean"):
        load_config(sources, host_facts=HOST)


def test_a_missing_vac_conf_is_skipped_when_vac_d_has_the_configuration(tmp_path):
    _write(tmp_path / "etc" / "vac.d" / "all.conf", S + MT_LHCB)
    sources = ConfigSources.for_main_file(str(tmp_path / "etc" / "vac.conf"), vac_runtime_file=str(tmp_path / "none"))
    config = load_config(sources, host_facts=HOST)
    assert list(config.machinetypes) == ["lhcb"]
    with pytest.raises(ConfigErrors, match="no configuration file found"):
        load_config(ConfigSources.for_main_file(str(tmp_path / "x" / "vac.conf")), host_facts=HOST)


def test_a_vac_file_that_is_not_utf8_loads_as_latin1_with_a_warning(tmp_path):
    path = tmp_path / "vac.conf"
    path.write_bytes(S.encode() + "description = Universit\xe9 de Paris\n".encode("latin-1"))
    config = load_config(ConfigSources.for_main_file(str(path), vac_runtime_file=str(tmp_path / "none")),
                         host_facts=HOST)
    assert config.settings.description == "Universit\xe9 de Paris"
    assert f"{path}: is not valid UTF-8 text (byte 64): read as Latin-1" in config.warnings
    strict = tmp_path / "factory.conf"
    strict.write_bytes(path.read_bytes())
    with pytest.raises(ConfigErrors, match="is not valid UTF-8 text"):
        load_config(ConfigSources.for_main_file(str(strict)), host_facts=HOST)


def test_a_vac_configuration_reads_vac_s_pipe_cache(tmp_path):
    """A migrated site's pipes cache (Vac's place, Vac's format) defines machinetypes at once."""
    cache = tmp_path / "pipescache"
    _write(cache / "gridpp.pipe", '{"cache_seconds": 3600, "machinetypes": [{"suffix": "lhcb", '
                                  '"target_share": 1, "root_image": "https://example.org/cernvm3.iso"}]}')
    text = (S + f"pipes_cache_dir = {cache}\n[vacuum_pipe gridpp]\n"
            "vacuum_pipe_url = https://repo.example.org/gridpp.pipe\ntarget_share = 2\n")
    path = _write(tmp_path / "vac.conf", text)
    config = load_config(ConfigSources.for_main_file(path, vac_runtime_file=str(tmp_path / "none")), host_facts=HOST)
    lhcb = config.machinetypes["gridpp-lhcb"]
    assert (lhcb.target_share, lhcb.machinetype_path) == (2.0, f"{MT_DIR}/gridpp")


def test_load_config_string_reads_vac_text_too():
    config = load_config_string(S + "draining = yes\n[DEFAULT]\nmb_per_processor = 1024\n", HOST, vac=True)
    assert (config.settings.draining, config.settings.mb_per_processor) == (True, 1024)
    with pytest.raises(ConfigErrors, match="unknown section"):
        load_config_string(S + "[DEFAULT]\nmb_per_processor = 1024\n", HOST)


# ---------------------------------------------------------------- what the engine decides from Vac's values


def _decide(text: str, load: float = 0.0):
    import random

    from vacfactory.core.scheduler import decide
    from vacfactory.engine.policies import factory_policy, machinetype_policies

    config = load_config_string(text, HOST, source=SOURCE, vac=True)
    return decide(factory_policy(config, HOST.cpu_count), machinetype_policies(config), (), {}, load, 1e9,
                  random.Random(1))


@pytest.mark.parametrize("extra,load,reason", [
    ("total_processors = 0\n", 0.0, "all 0 processors in use"),
    ("overload_per_processor = 0\n", 0.5, "overloaded"),
    ("draining = yes\n", 0.0, "draining"),
])
def test_vac_values_that_start_nothing_start_nothing(extra, load, reason):
    decision = _decide(S + extra + MT_LHCB, load)
    assert decision.creates == () and reason in decision.reason


def test_vac_values_the_engine_skips_and_those_it_starts():
    text = (S + "total_processors = 4\ndraining = true\n" + MT_LHCB + "min_wallclock_seconds = 90000\n"
            "[machinetype never]\ntarget_share = -1\nroot_image = cernvm3.iso\n"
            "[machinetype noimage]\ntarget_share = 5\n")
    decision = _decide(text)  # draining = true is off in a Vac file: VMs start
    assert [c.machinetype for c in decision.creates] == ["lhcb"] * 4
    assert all(c.processors == 1 for c in decision.creates)
