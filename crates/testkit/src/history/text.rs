//! Message text: Chinese and English from embedded word and character lists.
//!
//! Lengths follow a chat-like distribution: most messages are a few words or characters, a
//! few are paragraphs, a very few are pasted walls of text.

use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// The language a conversation is mostly held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lang {
    Chinese,
    English,
    Mixed,
}

impl Lang {
    pub(crate) fn pick(rng: &mut ChaCha8Rng) -> Self {
        match rng.random_range(0..10u32) {
            0..=5 => Lang::Chinese,
            6..=8 => Lang::English,
            _ => Lang::Mixed,
        }
    }
}

const EN_WORDS: &[&str] = &[
    "the", "be", "to", "of", "and", "a", "in", "that", "have", "I", "it", "for", "not", "on",
    "with", "he", "as", "you", "do", "at", "this", "but", "his", "by", "from", "they", "we", "say",
    "her", "she", "or", "an", "will", "my", "one", "all", "would", "there", "their", "what", "so",
    "up", "out", "if", "about", "who", "get", "which", "go", "me", "when", "make", "can", "like",
    "time", "no", "just", "him", "know", "take", "people", "into", "year", "your", "good", "some",
    "could", "them", "see", "other", "than", "then", "now", "look", "only", "come", "its", "over",
    "think", "also", "back", "after", "use", "two", "how", "our", "work", "first", "well", "way",
    "even", "new", "want", "because", "any", "these", "give", "day", "most", "us", "ok", "lol",
    "thanks", "dinner", "tonight", "meeting", "photo", "tomorrow", "sure", "sounds", "great",
    "haha", "later", "call", "free", "send", "file", "weekend", "coffee", "train", "late", "sorry",
    "home", "love", "miss", "happy", "birthday", "flight", "hotel", "price", "order", "link",
    "check", "maybe", "really", "yes", "yeah", "cool", "nice", "wait", "minutes", "office",
];

const EN_SHORT: &[&str] = &[
    "ok",
    "OK!",
    "lol",
    "haha",
    "thanks!",
    "on my way",
    "see you soon",
    "yes",
    "no problem",
    "👍",
    "sure",
    "got it",
    "omw",
    "call me",
    "good night",
    "😂😂",
    "done",
    "where are you?",
];

const ZH_CHARS: &str = "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动方期它头经长儿回位分爱老因很给名法间知世什两次使身者被高已亲其进此话常与活正感见明问力理点文几定本公特做外孩相西果走将月十实向声车全信重三机工物气每并别真打太新比才便夫再书部水像眼等体却加电主界门利海受听表德少克代员许先口由死安写性马光白或住难望教命花结乐色更拉东神记处让母父应直字场平报友关放至张认接告入笑内英军候民岁往何度山觉路带万男边风解叫任金快原吃妈变通师立象数四失满战远格士音轻目条呢病始达深完今提求清王化空业思切怎非找片罗钱吗语元喜曾离飞科言干流欢约各即指合反题必该论交终林请医晚制球决传画保读运及则房早院量苦火布品近坐产答星精视五连司巴奇管类未朋且婚台夜青北队久乎越观落尽形影红爸百令周吧识步希亚术留市半热送兴造谈容极随演收首根讲整式取照办强石古华拿计您装似足双妻尼转诉米称丽客南领节衣站黑刻统断福城故历惊脸选包紧争另建维绝树系伤示愿持千史谁准联妇纪基买志静阿诗独复痛消社算义竟确酒需单治卡幸兰念举仅钟怕共毛句息功官待究跟穿室易游程号居考突皮哪费倒价图具刚脑永歌响商礼细专黄块脚味灵改据般破引食仍存众注笔甚某沉血备习校默务土微娘须试怀料调广苏显赛查密议底列富梦错座参八除跑亮假印设线温虽掉京初养香停际致阳纸李纳验助激够严证帝饭忘趣支春集丈木研班普导顿睡展跳获艺六波察群皇段急庭创区奥器谢弟店否害草排背止组州朝封睛板角况曲馆育忙质河续哥呼若推境遇雨标姐充围案伦护冷警贝著雪索剧啊船险烟依斗值帮汉慢佛肯闻唱沙局伯族低玩资屋击速顾泪洲团圣旁堂兵七露园牛哭旅街劳型烈姑陈莫鱼异抱宝权鲁简态级票怪寻杀律胜份汽右洋范床舞秘午登楼贵吸责例追较职属渐左录丝牙党继托赶章智冲叶胡吉卖坚喝肉遗救修松临藏担戏善卫药悲敢靠伊村戴词森耳差短祖云规窗散迷油旧适乡架恩投弹铁博雷府压超负勒杂醒洗采毫嘴毕九冰既状乱景席珍童顶派素脱农疑练野按犯拍征坏骨余承置彩灯巨琴免环姆暗换技翻束增忍餐洛塞缺忆判欧层付阵玛批岛项狗休懂武革良恶恋委拥娜妙探呀营退摇弄桌熟诺宣银势奖宫忽套康供优课鸟喊降夏困刘罪亡鞋健模败伴守挥鲜财孤枪禁恐伙杰迹妹遍盖副坦牌江顺秋萨菜划授归浪凡预奶雄升编典袋莱含盛济蒙棋端腿招释介烧误";

const ZH_SHORT: &[&str] = &[
    "好的",
    "嗯嗯",
    "哈哈哈",
    "在吗？",
    "收到",
    "明天见",
    "晚上吃什么？",
    "我到了",
    "谢谢！",
    "没问题",
    "辛苦了",
    "好滴",
    "[微笑]",
    "[捂脸]",
    "等我一下",
    "马上到",
    "晚安",
    "👌",
    "是的",
    "周末有空吗？",
    "发你了",
    "看到了",
    "哈哈哈哈哈",
    "我也是",
];

const ZH_PUNCT: &[&str] = &["，", "，", "，", "。", "！", "？", "……"];
const EMOJI: &[&str] = &[
    "😀", "😂", "🤣", "😊", "😭", "👍", "🙏", "❤️", "🎉", "🔥", "😅", "🤔",
];

fn zh_char(rng: &mut ChaCha8Rng) -> char {
    // ZH_CHARS is CJK only: every char is 3 bytes in UTF-8, so index by char count.
    let n = ZH_CHARS.len() / 3;
    let i = rng.random_range(0..n);
    ZH_CHARS[i * 3..].chars().next().unwrap_or('好')
}

fn pick<'a>(rng: &mut ChaCha8Rng, list: &[&'a str]) -> &'a str {
    list[rng.random_range(0..list.len())]
}

/// Length in "units" (English words or Chinese characters): mostly short, long tail.
fn units(rng: &mut ChaCha8Rng) -> usize {
    match rng.random_range(0..100u32) {
        0..=54 => rng.random_range(1..=6),
        55..=87 => rng.random_range(6..=25),
        88..=97 => rng.random_range(25..=120),
        _ => rng.random_range(120..=1500),
    }
}

fn push_chinese(rng: &mut ChaCha8Rng, out: &mut String, n: usize) {
    let mut run = 0;
    for i in 0..n {
        out.push(zh_char(rng));
        run += 1;
        if i + 1 < n && run >= 4 && rng.random_range(0..8u32) == 0 {
            out.push_str(pick(rng, ZH_PUNCT));
            run = 0;
        }
    }
    out.push_str(if rng.random_bool(0.3) { "！" } else { "。" });
}

fn push_english(rng: &mut ChaCha8Rng, out: &mut String, n: usize) {
    for i in 0..n {
        let w = pick(rng, EN_WORDS);
        if i == 0 {
            let mut cs = w.chars();
            if let Some(c) = cs.next() {
                out.extend(c.to_uppercase());
                out.push_str(cs.as_str());
            }
        } else {
            out.push(' ');
            out.push_str(w);
        }
        if i + 1 < n && rng.random_range(0..12u32) == 0 {
            out.push(',');
        }
    }
    out.push_str(if rng.random_bool(0.2) { "?" } else { "." });
}

/// One message body in the given language.
pub(crate) fn message_body(rng: &mut ChaCha8Rng, lang: Lang) -> String {
    let n = units(rng);
    let mut out = String::new();
    let lang = match lang {
        Lang::Mixed => {
            if rng.random_bool(0.5) {
                Lang::Chinese
            } else {
                Lang::English
            }
        }
        other => other,
    };
    match lang {
        Lang::Chinese if n <= 3 && rng.random_bool(0.6) => out.push_str(pick(rng, ZH_SHORT)),
        Lang::English if n <= 3 && rng.random_bool(0.6) => out.push_str(pick(rng, EN_SHORT)),
        Lang::Chinese => push_chinese(rng, &mut out, n),
        _ => push_english(rng, &mut out, n),
    }
    if rng.random_range(0..10u32) == 0 {
        out.push_str(pick(rng, EMOJI));
    }
    out
}

/// A display name: a few Chinese characters or an English first name.
pub(crate) fn nickname(rng: &mut ChaCha8Rng) -> String {
    const EN_NAMES: &[&str] = &[
        "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack",
        "Kevin", "Lily", "Mia", "Nina", "Oscar", "Peter", "Queenie", "Ray", "Sam", "Tina",
    ];
    if rng.random_bool(0.6) {
        let n = rng.random_range(2..=3);
        (0..n).map(|_| zh_char(rng)).collect()
    } else {
        pick(rng, EN_NAMES).to_string()
    }
}

/// A line of an app log (compresses well, like real logs).
pub(crate) fn log_line(rng: &mut ChaCha8Rng, ts: i64, out: &mut String) {
    use std::fmt::Write as _;
    const TAGS: &[&str] = &["Net", "Sync", "Db", "Media", "Push", "Ui", "Voip"];
    const MSGS: &[&str] = &[
        "connect ok",
        "heartbeat sent",
        "sync batch done",
        "download finished",
        "retry after timeout",
        "cache hit",
        "wal checkpoint skipped",
        "notification shown",
    ];
    let level = match rng.random_range(0..20u32) {
        0 => 'E',
        1..=3 => 'W',
        4..=9 => 'D',
        _ => 'I',
    };
    let secs = ts.rem_euclid(86_400);
    let _ = writeln!(
        out,
        "{:02}:{:02}:{:02}.{:03} {}/{}: {} id={} cost={}ms",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        rng.random_range(0..1000u32),
        level,
        pick(rng, TAGS),
        pick(rng, MSGS),
        rng.random_range(1000..100_000u32),
        rng.random_range(0..900u32),
    );
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn chinese_characters_are_all_three_byte_cjk() {
        assert!(ZH_CHARS
            .chars()
            .all(|c| c.len_utf8() == 3 && ('\u{4e00}'..='\u{9fff}').contains(&c)));
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..1000 {
            assert!(!message_body(&mut rng, Lang::Chinese).is_empty());
        }
    }
}
