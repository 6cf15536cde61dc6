//! The sample world: an OMA, networks, and replicated VMs with their volumes.

use super::*;

pub const SAMPLE_VOLUME_SIZE: u64 = 50 * 1024 * 1024 * 1024;

/// The sample inventory the simulator creates for `seed` (same seed, same ids).
pub fn sample_inventory(seed: u64) -> SampleInventory {
    let mut ids = Ids(ChaCha8Rng::seed_from_u64(seed));
    let zone_id = ids.next();
    let service_offering_id = ids.next();
    let template_id = ids.next();
    let test_network_id = ids.next();
    let production_network_id = ids.next();
    let oma_vm_id = ids.next();
    let specs = [
        (
            "win-app-01",
            4,
            8192,
            "windows",
            "Windows Server 2019 (64-bit)",
            vec!["VM Network", "Backup"],
            vec![100u64, 200],
        ),
        (
            "lnx-web-01",
            2,
            4096,
            "linux",
            "Ubuntu 22.04 LTS",
            vec!["VM Network", "DMZ"],
            vec![],
        ),
        (
            "lnx-db-01",
            8,
            16384,
            "linux",
            "Rocky Linux 9",
            vec!["VM Network"],
            vec![],
        ),
    ];
    let boot_disks = specs.len() as u32;
    let mut data_slot = boot_disks;
    let mut vms: Vec<SampleVm> = specs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, (name, cpu, memory_mb, os, guest, nets, _))| {
            let volume_id = ids.next();
            SampleVm {
                name: name.to_string(),
                cpu,
                memory_mb,
                os_type: os.to_string(),
                guest_os: guest.to_string(),
                source_networks: nets.into_iter().map(String::from).collect(),
                linstor_resource: crate::providers::linstor::resource_name_for_volume(&volume_id),
                volume_id,
                volume_size: SAMPLE_VOLUME_SIZE,
                oma_vm_id: oma_vm_id.clone(),
                oma_device_id: i as u32 + 1,
                data_disks: Vec::new(),
            }
        })
        .collect();
    // Data disks' ids come after every other id, so a seed's other ids are as they were.
    for (vm, spec) in vms.iter_mut().zip(&specs) {
        for gib in &spec.6 {
            data_slot += 1;
            vm.data_disks.push(SampleDisk {
                volume_id: ids.next(),
                size: gib * 1024 * 1024 * 1024,
                oma_device_id: data_slot,
            });
        }
    }
    let dmz_network_id = ids.next();
    let backup_network_id = ids.next();
    let fixed_offerings = [("Small", 2, 4096), ("Medium", 4, 8192), ("Large", 8, 16384)]
        .into_iter()
        .map(|(name, cpu, memory_mb)| SampleOffering {
            id: ids.next(),
            name: name.into(),
            cpu,
            memory_mb,
        })
        .collect();
    SampleInventory {
        fixed_offerings,
        dmz_network_id,
        backup_network_id,
        zone_id,
        service_offering_id,
        template_id,
        oma_vm_id,
        oma_vm_name: "oma-appliance-01".into(),
        test_network_id,
        production_network_id,
        vms,
    }
}

impl SampleInventory {
    /// The sample as Tern's inventory: each sample VM with a stable VMware-style id (derived
    /// from its name), its NICs, its volume on the OMA and a last sync, plus test and
    /// production network mappings for every source network.
    pub fn to_inventory(&self) -> crate::domain::inventory::InventoryFile {
        use crate::domain::inventory::{Disk, InventoryFile, NetworkKind, NetworkMapping, Nic, VmRecord};
        let mut inv = InventoryFile::default();
        for (i, vm) in self.vms.iter().enumerate() {
            let vm_id = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("tern-sample:{}", vm.name).as_bytes(),
            )
            .to_string();
            for net in &vm.source_networks {
                for (kind, dest) in [
                    (NetworkKind::Test, self.test_network_id.as_str()),
                    (NetworkKind::Production, self.production_network_for(net)),
                ] {
                    inv.network_mappings.push(NetworkMapping {
                        vm_id: vm_id.clone(),
                        source_network: net.clone(),
                        destination_network_id: dest.to_string(),
                        kind,
                    });
                }
            }
            inv.vms.push(VmRecord {
                vm_id,
                name: vm.name.clone(),
                cpu_count: vm.cpu,
                memory_mb: u32::try_from(vm.memory_mb).unwrap_or(u32::MAX),
                os_type: vm.os_type.clone(),
                nics: vm
                    .source_networks
                    .iter()
                    .enumerate()
                    .map(|(j, n)| {
                        let (mac, ip) = source_nic(i, j, n);
                        Nic {
                            source_network: n.clone(),
                            mac: Some(mac),
                            ip: Some(ip),
                        }
                    })
                    .collect(),
                boot_disk: Disk {
                    volume_id: vm.volume_id.clone(),
                    size_bytes: Some(vm.volume_size),
                    unit_number: 0,
                },
                data_disks: (1..)
                    .zip(&vm.data_disks)
                    .map(|(unit_number, d)| Disk {
                        volume_id: d.volume_id.clone(),
                        size_bytes: Some(d.size),
                        unit_number,
                    })
                    .collect(),
                oma_vm_id: vm.oma_vm_id.clone(),
                last_sync_change_id: Some(format!("52 3c ec 11 9e 2c 4c 3d-87 4a c3 4e 85 f2 ea 95/{}", vm.cpu)),
            });
        }
        inv
    }
}

/// The MAC and IP of NIC `j` of sample VM `i` (VMware's OUI; an address in the production
/// network its port group maps to, so a live failover can keep it).
fn source_nic(i: usize, j: usize, source_network: &str) -> (String, String) {
    let mac = format!("00:50:56:{:02x}:{:02x}:{:02x}", 0x10 + i, j, 0x21);
    let subnet = match source_network {
        "DMZ" => 2,
        "Backup" => 3,
        _ => 0,
    };
    (mac, format!("10.{subnet}.1.{}", 20 + i))
}
